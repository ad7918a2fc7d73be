//! The route hash is a contract (it places keys on workers and rule routes are checkpointed):
//! `Key::hash` must equal the values computed independently by `tests/golden/route_hashes.py`
//! from the definition in docs/ARCHITECTURE.md ("Routing"), checked in as
//! `tests/golden/route_hashes.json`.

use operators::Key;
use serde_json::Value;

#[test]
fn route_hashes_equal_the_independently_computed_golden_values() {
    let golden: Vec<Value> = serde_json::from_str(include_str!("golden/route_hashes.json")).unwrap();
    assert!(golden.len() >= 10);
    for row in &golden {
        let key = row["key"].as_str().unwrap();
        let k = match row["kind"].as_str().unwrap() {
            "coin" => Key::Coin(key),
            "protocol" => Key::Protocol(key),
            "chain" => Key::Chain(key),
            other => panic!("unknown kind {other}"),
        };
        let want: u64 = row["hash"].as_str().unwrap().parse().unwrap();
        assert_eq!(k.hash(), want, "{row}");
        for (workers, worker) in row["workers"].as_object().unwrap() {
            let w: u64 = workers.parse().unwrap();
            assert_eq!(k.hash() % w, worker.as_u64().unwrap(), "{key} on {w} workers");
        }
    }
}
