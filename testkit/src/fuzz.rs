//! Inputs for fuzzing the decoders that take outside bytes: arbitrary text, and valid samples
//! mutated (bytes inserted, deleted, replaced; truncated; spliced with another sample).
//!
//! Every crate's `fuzz_*` tests take their case count from `LLAMAFLOW_FUZZ_CASES` (the
//! documented run in README's testing section uses 1,000,000; CI runs the default).

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per decoder: `LLAMAFLOW_FUZZ_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("LLAMAFLOW_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The proptest configuration of a fuzz test: [`cases`], no regression files.
pub fn config(default: u32) -> Config {
    Config {
        cases: cases(default),
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    }
}

/// Characters that matter to the decoders' syntaxes, beside arbitrary ones.
const SPECIAL: &[char] = &[
    '{',
    '}',
    '[',
    ']',
    '"',
    ':',
    ',',
    '\\',
    '0',
    '1',
    '9',
    '-',
    '+',
    '.',
    'e',
    'E',
    ' ',
    '\n',
    '\t',
    '\0',
    '=',
    '#',
    '\'',
    'n',
    't',
    'f',
    'é',
    '€',
    '\u{FEFF}',
    '\u{10FFFF}',
];

fn a_char() -> impl Strategy<Value = char> {
    prop_oneof![3 => prop::sample::select(SPECIAL), 1 => any::<char>()]
}

/// One edit of a text, at a position given as a fraction of its length.
#[derive(Clone, Debug)]
enum Edit {
    Insert(f64, char),
    Delete(f64),
    Replace(f64, char),
    Truncate(f64),
    Splice(f64, usize, f64),
}

fn apply(text: &str, edits: &[Edit], samples: &[&str]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let at = |f: f64, n: usize| ((f * n as f64) as usize).min(n);
    for e in edits {
        match *e {
            Edit::Insert(f, c) => {
                let i = at(f, chars.len());
                chars.insert(i, c);
            }
            Edit::Delete(f) if !chars.is_empty() => {
                let i = at(f, chars.len() - 1);
                chars.remove(i);
            }
            Edit::Replace(f, c) if !chars.is_empty() => {
                let i = at(f, chars.len() - 1);
                chars[i] = c;
            }
            Edit::Truncate(f) => chars.truncate(at(f, chars.len())),
            Edit::Splice(f, other, g) => {
                let other: Vec<char> = samples[other % samples.len()].chars().collect();
                let (i, j) = (at(f, chars.len()), at(g, other.len()));
                chars.splice(i.., other[j..].iter().copied());
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

fn edit() -> impl Strategy<Value = Edit> {
    let f = 0.0..=1.0f64;
    prop_oneof![
        4 => (f.clone(), a_char()).prop_map(|(f, c)| Edit::Insert(f, c)),
        3 => f.clone().prop_map(Edit::Delete),
        4 => (f.clone(), a_char()).prop_map(|(f, c)| Edit::Replace(f, c)),
        1 => f.clone().prop_map(Edit::Truncate),
        1 => (f.clone(), any::<usize>(), f).prop_map(|(f, o, g)| Edit::Splice(f, o, g)),
    ]
}

/// Text for a decoder whose valid inputs look like `samples`: mostly mutated samples, some
/// arbitrary strings.
pub fn text(samples: &'static [&'static str]) -> impl Strategy<Value = String> {
    let mutated = (0..samples.len(), prop::collection::vec(edit(), 1..6))
        .prop_map(move |(i, edits)| apply(samples[i], &edits, samples));
    let arbitrary = prop::collection::vec(a_char(), 0..64).prop_map(|cs| cs.into_iter().collect::<String>());
    prop_oneof![4 => mutated, 1 => arbitrary, 1 => any::<String>()]
}

/// Counts the cases a fuzz test ran, and says so when dropped (run with `--nocapture`).
pub struct Count(&'static str, AtomicU64);

impl Count {
    /// A counter for the decoder `name`.
    pub const fn new(name: &'static str) -> Self {
        Count(name, AtomicU64::new(0))
    }

    /// One more case.
    pub fn add(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }

    /// Prints the count.
    pub fn report(&self) {
        eprintln!(
            "fuzz {}: {} cases, none panicked",
            self.0,
            self.1.load(Ordering::Relaxed)
        );
    }
}
