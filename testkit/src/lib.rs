//! Real services for integration tests, each private to the test that starts it: a
//! PostgreSQL cluster with `wal_level=logical`, a Redis server and a moto (AWS emulator)
//! server, all bound to 127.0.0.1 on a free port and stopped when dropped.
//!
//! Binaries are found on the usual Debian paths (`/usr/lib/postgresql/*/bin`,
//! `redis-server`, `moto_server` on PATH or in `$LLAMAFLOW_MOTO_VENV/bin`); `.ci/run`
//! installs what a fresh machine lacks. [`fuzz`] holds the inputs of the decoders' fuzz tests.

pub mod fuzz;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An HTTP answer read by [`http_get`].
#[derive(Clone, Debug, Default)]
pub struct HttpReply {
    /// Status code; 0 when nothing answered.
    pub status: u16,
    /// Headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: String,
}

impl HttpReply {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 GET of `path` on 127.0.0.1:`port` (a fresh connection, closed after): an
/// independent client for tests and benches; status 0 when nothing listens.
pub fn http_get(port: u16, path: &str) -> HttpReply {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return HttpReply::default();
    };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return HttpReply::default();
    };
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    HttpReply {
        status,
        body: if chunked { dechunk(body) } else { body.to_string() },
        headers,
    }
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut raw: &str) -> String {
    let mut body = String::new();
    while let Some((size, rest)) = raw.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        body.push_str(&rest[..size]);
        raw = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    body
}

/// A free TCP port on 127.0.0.1 (bind to :0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Waits until `127.0.0.1:port` accepts connections.
pub fn wait_for_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The newest PostgreSQL server binaries directory on this machine.
pub fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("LLAMAFLOW_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .expect("PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root (initdb refuses root).
fn pg_command(bin: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// A private PostgreSQL cluster (`wal_level=logical`, trust auth, superuser `postgres`).
pub struct Postgres {
    child: Option<Child>,
    /// Port on 127.0.0.1.
    pub port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Initialises and starts a cluster on a free port (about a second).
    pub fn start() -> Postgres {
        let bin = pg_bin_dir();
        let root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("llamaflow-pg")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
            assert!(
                ok.map(|s| s.success()).unwrap_or(false),
                "chown of the temp dir to postgres"
            );
        }
        let out = pg_command(&bin.join("initdb"), root)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            child: None,
            port: free_port(),
            data,
            _dir: dir,
        };
        pg.launch();
        pg
    }

    /// Starts the server process on this cluster's data and port and waits until it answers.
    fn launch(&mut self) {
        let bin = pg_bin_dir();
        let root = is_root();
        let sockets = self
            .data
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let child = pg_command(&bin.join("postgres"), root)
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(sockets)
            .args([
                "-c",
                "wal_level=logical",
                "-c",
                "max_replication_slots=10",
                "-c",
                "max_wal_senders=10",
            ])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        if !wait_for_port(self.port, Duration::from_secs(30)) {
            self.stop();
            panic!("postgres did not start on port {}", self.port);
        }
        // Accepting TCP is not quite ready for queries during recovery; wait for pg_isready.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a stopped server again on the same data and port (outage tests).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs one SQL statement with psql (errors stop it); returns the unaligned output
    /// (`|`-separated columns, one row per line).
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(pg_bin_dir().join("psql"))
            .args([
                &self.url(),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-tA",
                "-F",
                "|",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// Debian's server builds refuse logical-decoding output plugins not listed in
    /// `output_plugin_libraries` (when that setting exists); list wal2json, as an operator
    /// would, and wait for the reload.
    pub fn allow_wal2json(&self) {
        if self.psql("SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'") != "1" {
            return;
        }
        let current = self.psql("SHOW output_plugin_libraries");
        if current.split(',').any(|l| l.trim().trim_matches('"') == "wal2json") {
            return;
        }
        let mut libs: Vec<String> = current
            .split(',')
            .map(|l| l.trim().trim_matches('"'))
            .filter(|l| !l.is_empty())
            .map(|l| format!("'{l}'"))
            .collect();
        libs.push("'wal2json'".to_string());
        self.psql(&format!(
            "ALTER SYSTEM SET output_plugin_libraries = {}",
            libs.join(", ")
        ));
        self.psql("SELECT pg_reload_conf()");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.psql("SHOW output_plugin_libraries").contains("wal2json") {
            assert!(Instant::now() < deadline, "configuration reload");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server: SIGINT (fast shutdown) to the postmaster named in `postmaster.pid`
    /// (as root the child is `runuser`, not the postmaster), then reaps the child.
    pub fn stop(&mut self) {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        if let Some(pid) = pid {
            let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private Redis server (no persistence).
pub struct Redis {
    child: Child,
    /// Port on 127.0.0.1.
    pub port: u16,
}

impl Redis {
    /// Starts `redis-server` on a free port, optionally with a password.
    pub fn start(password: Option<&str>) -> Redis {
        Self::start_on(free_port(), password)
    }

    /// Starts `redis-server` on a given port (used to bring one back after an outage).
    pub fn start_on(port: u16, password: Option<&str>) -> Redis {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        let mut r = Redis { child, port };
        if !wait_for_port(port, Duration::from_secs(10)) {
            kill(&mut r.child);
            panic!("redis-server did not start on port {port}");
        }
        r
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A moto server (AWS emulator: SQS, S3) on a free port.
pub struct Moto {
    child: Child,
    /// Port on 127.0.0.1.
    pub port: u16,
}

/// The `moto_server` executable: `$LLAMAFLOW_MOTO_VENV/bin/moto_server`, else on PATH.
pub fn moto_server_bin() -> PathBuf {
    if let Ok(venv) = std::env::var("LLAMAFLOW_MOTO_VENV") {
        return Path::new(&venv).join("bin/moto_server");
    }
    PathBuf::from("moto_server")
}

impl Moto {
    /// Starts `moto_server -H 127.0.0.1 -p <port>`.
    pub fn start() -> Moto {
        let port = free_port();
        let child = Command::new(moto_server_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]'; or set LLAMAFLOW_MOTO_VENV)");
        let mut m = Moto { child, port };
        if !wait_for_port(port, Duration::from_secs(30)) {
            kill(&mut m.child);
            panic!("moto_server did not start on port {port}");
        }
        m
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A TCP forwarder to a local port that tests can take down and bring back, to make a service
/// unreachable without stopping it (its state survives the "outage").
pub struct TcpProxy {
    port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl TcpProxy {
    /// Forwards a new loopback port to `127.0.0.1:target`.
    pub fn start(target: u16) -> TcpProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (down2, open2) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if down2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let pipes = (client.try_clone(), server.try_clone());
                let (Ok(c2), Ok(s2)) = pipes else { continue };
                if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                    let mut o = open2.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    o.push(a);
                    o.push(b);
                }
                let copy = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                };
                copy(client, s2);
                copy(server, c2);
            }
        });
        TcpProxy { port, down, open }
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Takes the service down (open connections are cut, new ones refused) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for s in open.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// The `llamaflow` binary built beside the running bench example: the example is
/// `target/<profile>/examples/<name>`, the binary `target/<profile>/llamaflow`.
pub fn llamaflow_beside_example() -> PathBuf {
    let exe = std::env::current_exe().expect("the bench's own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/examples/<name>")
        .join("llamaflow")
}

/// Raises this process's soft open-file limit to the hard one (children inherit it) and
/// returns it: load tests hold one descriptor per connection.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a valid, initialised struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `"VmHWM:"`, peak RSS), in KiB; 0 when unknown.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A child process killed (and reaped) when dropped, so a failing test or bench leaves nothing
/// behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds a process has used so far, `(user, system)`, from `/proc/<pid>/stat`; zeros
/// when unknown.
pub fn cpu_secs(pid: u32) -> (f64, f64) {
    cpu_secs_of(&format!("/proc/{pid}/stat"))
}

/// (user, system) CPU seconds from a `stat` file of `/proc` (a process's or a thread's).
pub fn cpu_secs_of(path: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // After the command name (in parentheses): utime is the 12th field, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let secs = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / hz;
    (secs(11), secs(12))
}

/// A new 2048-bit RSA private key in PKCS#8 PEM (`openssl genpkey`), written to `path` and
/// returned (service-account keys of the push tests).
pub fn rsa_key_pem(path: &Path) -> String {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(path)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(path).expect("read the key")
}

/// The Python of the test venv: `$LLAMAFLOW_VENV/bin/python`, else `python3`.
pub fn python() -> PathBuf {
    match std::env::var_os("LLAMAFLOW_VENV") {
        Some(v) => Path::new(&v).join("bin/python"),
        None => PathBuf::from("python3"),
    }
}

/// An SMTP server (Python `aiosmtpd`, `testkit/smtp_sink.py`) on a free port that parses
/// every accepted mail and keeps it as a JSON line: `from`, `to`, `header_from`, `subject`,
/// `message_id`, `text`, `html`, `authenticated`. Recipients at `@bounce.example` are refused
/// with 550, those at `@flaky.example` with 451 on their first try.
pub struct Smtp {
    child: Child,
    /// Port on 127.0.0.1.
    pub port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Smtp {
    /// Starts the server; with `auth`, it requires AUTH with that user and password.
    pub fn start(auth: Option<(&str, &str)>) -> Smtp {
        Smtp::start_with(auth, None)
    }

    /// As [`Smtp::start`]; with `tls` (certificate and key PEM files), STARTTLS is offered and
    /// required, and AUTH is taken only over it.
    pub fn start_with(auth: Option<(&str, &str)>, tls: Option<(&Path, &Path)>) -> Smtp {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("smtp_sink.py");
        std::fs::write(&script, include_str!("../smtp_sink.py")).expect("write smtp_sink.py");
        let out = dir.path().join("mails.jsonl");
        let port = free_port();
        let mut cmd = Command::new(python());
        cmd.arg(&script).arg(port.to_string()).arg(&out);
        if let Some((u, p)) = auth {
            cmd.args([u, p]);
            if let Some((cert, key)) = tls {
                cmd.arg(cert).arg(key);
            }
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python with aiosmtpd (set LLAMAFLOW_VENV to a venv with aiosmtpd)");
        let mut s = Smtp {
            child,
            port,
            out,
            _dir: dir,
        };
        if !wait_for_port(port, Duration::from_secs(30)) {
            kill(&mut s.child);
            panic!("the aiosmtpd server did not start on port {port} (pip install aiosmtpd)");
        }
        s
    }

    /// The mails received so far, one JSON object per line, in arrival order.
    pub fn mails(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_and_redis_start_and_answer() {
        let pg = Postgres::start();
        let out = Command::new(pg_bin_dir().join("psql"))
            .args([&pg.url(), "-tAc", "show wal_level"])
            .output()
            .expect("psql");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "logical");
        pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
        let mut pg = pg;
        pg.stop();
        assert!(TcpStream::connect(("127.0.0.1", pg.port)).is_err(), "stopped");
        pg.restart();
        assert_eq!(pg.psql("SELECT x FROM t"), "7", "restart keeps the data");
        let r = Redis::start(None);
        let mut s = TcpStream::connect(("127.0.0.1", r.port)).expect("redis accepts");
        use std::io::{Read, Write};
        s.write_all(b"PING\r\n").expect("write");
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"+PONG\r\n");
    }
}
