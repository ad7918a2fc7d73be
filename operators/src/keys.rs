//! Keys interned to dense integers.
//!
//! The sequencer numbers each distinct key it routes (a coin, a protocol or a chain) once
//! ([`Interner`]) and stamps the number on the key's envelopes ([`KeyId`]). A worker keeps
//! each key's entry in an array ([`KeyTable`]) and, after a key's first envelope, finds it
//! by that number: an array index instead of hashing and comparing the key's string twice
//! per record (its state and its rules).
//!
//! Numbers are only a shortcut, never state: they are not checkpointed, and a worker learns
//! what a number means from the name the envelope also carries, the first time it sees it.
//! So a restored or rescaled worker (whose table is rebuilt from names) and a fresh
//! sequencer agree without coordination. A number keeps its meaning for the life of its
//! sequencer; in a cluster each process's numbers are made distinct ([`KeyId::scoped`]).

use serde::{Deserialize, Serialize};

use crate::candidate::FastMap;
use crate::envelope::Key;

/// A key's number from its process's [`Interner`]; [`KeyId::NONE`] for an envelope without
/// one (rules, deletions, closes), which a worker then finds by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyId(u32);

impl KeyId {
    /// No number: find the key by name.
    pub const NONE: KeyId = KeyId(u32::MAX);

    /// This process's number made distinct from every other process's in a cluster of
    /// `processes` (as sequence numbers are): `id × processes + process`, or
    /// [`KeyId::NONE`] where that does not fit.
    pub fn scoped(self, processes: u32, process: u32) -> KeyId {
        if self == KeyId::NONE {
            return self;
        }
        self.0
            .checked_mul(processes)
            .and_then(|x| x.checked_add(process))
            .filter(|x| *x != u32::MAX)
            .map_or(KeyId::NONE, KeyId)
    }

    fn index(self) -> Option<usize> {
        (self != KeyId::NONE).then_some(self.0 as usize)
    }
}

/// The sequencer's numbering: every key it has routed, with its number and route (so the
/// key's hash is computed once, not per record). Keys are never forgotten — a number must
/// keep its meaning while the dataflow runs — so its size is the number of distinct keys
/// seen (the `interned_keys` gauge).
///
/// An open-addressing table of its own rather than a map, so that a key's entry can be loaded
/// into the cache a few records ahead ([`Interner::prefetch`]): with tens of thousands of
/// coins, a lookup used to wait on memory three times (the map's slot, its entry, the boxed
/// name). An entry holds its name inline (up to [`INLINE_NAME`] bytes), so one entry is all a
/// lookup reads after the slot index.
#[derive(Clone, Debug)]
pub struct Interner {
    /// Linear probing over a power-of-two array, at most half full: 0 is empty, else the high
    /// half of the entry's hash (so a probe past another key reads no entry) over `i + 1`,
    /// pointing at `entries[i]`.
    slots: Vec<u64>,
    entries: Vec<Interned>,
    next: u32,
}

/// Names up to this many bytes are held inside their [`Interner`] entry (nearly every
/// DeFiLlama key: `ethereum:0x…` addresses are 51); longer ones are boxed.
pub const INLINE_NAME: usize = 86;

/// One key of an [`Interner`]: two cache lines, both loaded by a prefetch.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
struct Interned {
    hash: u64,
    route: u64,
    id: KeyId,
    kind: u8,
    /// Bytes of `inline` in use, or `u8::MAX` when the name is in `long`.
    len: u8,
    inline: [u8; INLINE_NAME],
    long: Option<Box<str>>,
}

impl Interned {
    fn name(&self) -> &[u8] {
        match &self.long {
            Some(name) => name.as_bytes(),
            None => &self.inline[..self.len as usize],
        }
    }
}

impl Default for Interner {
    fn default() -> Self {
        Interner {
            slots: vec![0; 16],
            entries: Vec::new(),
            next: 0,
        }
    }
}

/// The slot of entry `n` with table hash `hash` (see [`Interner`]'s `slots`). Entries are
/// numbered from 1 here; 2³² − 1 of them (at 128 bytes each) are past any memory, so the
/// number fits.
fn slot(hash: u64, n: usize) -> u64 {
    (hash >> 32 << 32) | (n as u64 + 1)
}

/// The table hash of a key (not its route: any fixed, fast hash will do, as nothing outside
/// this process sees it).
fn table_hash(kind: u8, name: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x6c6c_616d_6166_6c6f).hash_one((kind, name))
}

/// A key's hash in an [`Interner`]'s table, computed once per record ([`Interner::hash`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyHash(u64);

fn kind_and_name(key: Key<'_>) -> (u8, &str) {
    match key {
        Key::Coin(s) => (0, s),
        Key::Protocol(s) => (1, s),
        Key::Chain(s) => (2, s),
    }
}

impl Interner {
    /// The number and route of `key`, numbering it if new. Past 2³² − 1 keys, new keys go
    /// without a number (found by name).
    pub fn intern(&mut self, key: Key<'_>) -> (KeyId, u64) {
        self.intern_hashed(key, Interner::hash(key))
    }

    /// [`Interner::intern`] with the key's hash computed before ([`Interner::hash`] of the
    /// same key), so that a record's key is hashed once for its prefetches and its push.
    pub fn intern_hashed(&mut self, key: Key<'_>, hash: KeyHash) -> (KeyId, u64) {
        let (kind, name) = kind_and_name(key);
        let hash = hash.0;
        debug_assert_eq!(hash, table_hash(kind, name), "the hash of another key");
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            match self.slots[i] {
                0 => break,
                s if s >> 32 == hash >> 32 => {
                    let e = &self.entries[(s as u32 - 1) as usize];
                    if e.hash == hash && e.kind == kind && e.name() == name.as_bytes() {
                        return (e.id, e.route);
                    }
                }
                _ => {}
            }
            i = (i + 1) & mask;
        }
        let id = if self.next == u32::MAX {
            KeyId::NONE
        } else {
            self.next += 1;
            KeyId(self.next - 1)
        };
        let route = key.hash();
        let mut entry = Interned {
            hash,
            route,
            id,
            kind,
            len: u8::MAX,
            inline: [0; INLINE_NAME],
            long: None,
        };
        match name.len() {
            n if n <= INLINE_NAME => {
                entry.inline[..n].copy_from_slice(name.as_bytes());
                entry.len = n as u8;
            }
            _ => entry.long = Some(name.into()),
        }
        self.entries.push(entry);
        self.slots[i] = slot(hash, self.entries.len() - 1);
        if self.entries.len() * 2 > self.slots.len() {
            self.grow();
        }
        (id, route)
    }

    /// Doubles the slot array and places every entry again.
    fn grow(&mut self) {
        let size = self.slots.len() * 2;
        let mask = size - 1;
        self.slots = vec![0; size];
        for (n, e) in self.entries.iter().enumerate() {
            let mut i = e.hash as usize & mask;
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot(e.hash, n);
        }
    }

    /// The hash [`Interner::intern_hashed`] and [`Interner::prefetch`] take for `key`.
    pub fn hash(key: Key<'_>) -> KeyHash {
        let (kind, name) = kind_and_name(key);
        KeyHash(table_hash(kind, name))
    }

    /// Starts loading what [`Interner::intern`] of the key hashed `hash` will read, without
    /// waiting for it (see [`prefetch`]): with `far`, the key's slot; without, the entry the
    /// slot points at (call some records after the `far` call, once the slot has arrived).
    /// Changes nothing.
    pub fn prefetch(&self, hash: KeyHash, far: bool) {
        let i = hash.0 as usize & (self.slots.len() - 1);
        if far {
            prefetch(&self.slots[i]);
        } else if let Some(e) = (self.slots[i] as u32)
            .checked_sub(1)
            .and_then(|s| self.entries.get(s as usize))
        {
            prefetch_value(e);
        }
    }

    /// Distinct keys numbered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// One kind of key's entries on one worker, in a dense array: found by [`KeyId`] (an array
/// index, once the number was seen with its name) or by name. An entry, once made, keeps
/// its slot (the numbers point at it); what it holds may be emptied.
#[derive(Debug)]
pub struct KeyTable<V> {
    by_name: FastMap<Box<str>, u32>,
    /// [`KeyId`] → slot (`u32::MAX`: not seen yet).
    by_id: Vec<u32>,
    entries: Vec<(Box<str>, V)>,
}

impl<V> Default for KeyTable<V> {
    fn default() -> Self {
        KeyTable {
            by_name: FastMap::default(),
            by_id: Vec::new(),
            entries: Vec::new(),
        }
    }
}

impl<V: Default> KeyTable<V> {
    /// The slot of key `name` (numbered `id`), made if new.
    fn slot(&mut self, id: KeyId, name: &str) -> usize {
        if let Some(slot) = self.by_number(id) {
            debug_assert_eq!(&*self.entries[slot].0, name, "a key number changed its meaning");
            return slot;
        }
        let slot = match self.by_name.get(name) {
            Some(&s) => s as usize,
            None => {
                let s = self.entries.len();
                self.entries.push((name.into(), V::default()));
                self.by_name.insert(name.into(), s as u32);
                s
            }
        };
        if let Some(i) = id.index() {
            if self.by_id.len() <= i {
                self.by_id.resize(i + 1, u32::MAX);
            }
            self.by_id[i] = slot as u32;
        }
        slot
    }

    /// The entry of key `name` (numbered `id`), made if new.
    pub fn entry(&mut self, id: KeyId, name: &str) -> &mut V {
        let slot = self.slot(id, name);
        &mut self.entries[slot].1
    }
}

impl<V> KeyTable<V> {
    fn by_number(&self, id: KeyId) -> Option<usize> {
        let s = *self.by_id.get(id.index()?)?;
        (s != u32::MAX).then_some(s as usize)
    }

    /// The entry of key `name` (numbered `id`), if it has one.
    pub fn find(&mut self, id: KeyId, name: &str) -> Option<&mut V> {
        let slot = match self.by_number(id) {
            Some(s) => s,
            None => *self.by_name.get(name)? as usize,
        };
        Some(&mut self.entries[slot].1)
    }

    /// Every entry with its key's name, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.entries.iter().map(|(n, v)| (&**n, v))
    }

    /// The entry numbered `id`, if this table has seen the number (nothing is looked up by
    /// name or made).
    pub fn peek(&self, id: KeyId) -> Option<&V> {
        self.by_number(id).map(|s| &self.entries[s].1)
    }

    /// Starts loading the entry numbered `id` into the cache (see [`prefetch`]), if this
    /// table has seen the number. Reads only the table's own index, which stays cached.
    pub fn prefetch(&self, id: KeyId) {
        if let Some(s) = self.by_number(id) {
            prefetch_value(&self.entries[s]);
        }
    }
}

/// Asks the CPU to start loading the cache line at `p`, without waiting for it. A hint only:
/// it changes no result and never faults, whatever the address. A no-op on other than x86-64.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 performs no architectural memory access and cannot fault, for any
    // address (Intel SDM, "PREFETCHh"); `p` is never dereferenced.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`] of every cache line of `value`.
#[inline(always)]
pub fn prefetch_value<T>(value: &T) {
    let start = (value as *const T).cast::<u8>();
    for offset in (0..std::mem::size_of::<T>()).step_by(64) {
        prefetch(start.wrapping_add(offset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_interner_numbers_each_key_once_per_kind_and_keeps_its_route() {
        let mut i = Interner::default();
        let (a, ra) = i.intern(Key::Coin("x"));
        let (b, rb) = i.intern(Key::Chain("x"));
        assert_ne!(a, b, "a coin and a chain of the same name are different keys");
        assert_eq!((ra, rb), (Key::Coin("x").hash(), Key::Chain("x").hash()));
        assert_eq!(i.intern(Key::Coin("x")), (a, ra));
        assert_eq!(i.len(), 2);
    }

    #[test]
    fn scoped_numbers_are_distinct_across_processes_and_never_overflow() {
        let ids: Vec<KeyId> = (0..3u32)
            .flat_map(|p| (0..100u32).map(move |n| KeyId(n).scoped(3, p)))
            .collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        assert_eq!(KeyId(u32::MAX / 2).scoped(3, 0), KeyId::NONE);
        assert_eq!(KeyId::NONE.scoped(1, 0), KeyId::NONE);
    }

    proptest! {
        /// The interner numbers each (kind, name) once, in order of first appearance, with the
        /// key's route: names short, exactly inline-sized or one byte past it (boxed), the
        /// same name as several kinds, names differing only in their last byte, and the table
        /// growing several times; prefetching changes nothing.
        #[test]
        fn the_interner_numbers_keys_by_first_appearance(keys in prop::collection::vec((0u8..3, 0u16..400, 0usize..3), 1..3000)) {
            let mut interner = Interner::default();
            let mut model: std::collections::HashMap<(u8, String), u32> = Default::default();
            for (kind, n, size) in keys {
                let len = [0, INLINE_NAME, INLINE_NAME + 1][size];
                let name = format!("{:x>len$}", format!("-{n}"));
                let key = match kind {
                    0 => Key::Coin(&name),
                    1 => Key::Protocol(&name),
                    _ => Key::Chain(&name),
                };
                let next = model.len() as u32;
                let want = *model.entry((kind, name.clone())).or_insert(next);
                let hash = Interner::hash(key);
                interner.prefetch(hash, true);
                interner.prefetch(hash, false);
                let got = if n % 2 == 0 { interner.intern(key) } else { interner.intern_hashed(key, hash) };
                prop_assert_eq!(got, (KeyId(want), key.hash()), "{:?}", key);
            }
            prop_assert_eq!(interner.len(), model.len());
        }

        /// A table fed by several sequencers' numbers (scoped, as in a cluster) and by
        /// names alone gives each name one entry, as a map keyed by name would.
        #[test]
        fn a_key_table_is_a_map_by_name(ops in prop::collection::vec((0u32..2, 0u8..12, any::<bool>()), 1..200)) {
            let mut seqs = [Interner::default(), Interner::default()];
            let mut table: KeyTable<Vec<usize>> = KeyTable::default();
            let mut model: std::collections::HashMap<String, Vec<usize>> = Default::default();
            for (step, (process, key, numbered)) in ops.into_iter().enumerate() {
                let name = format!("coin-{key}");
                let id = if numbered {
                    seqs[process as usize].intern(Key::Coin(&name)).0.scoped(2, process)
                } else {
                    KeyId::NONE
                };
                table.entry(id, &name).push(step);
                model.entry(name.clone()).or_default().push(step);
                prop_assert_eq!(table.find(id, &name).cloned(), model.get(&name).cloned());
            }
            prop_assert_eq!(table.iter().count(), model.len());
            for (name, steps) in table.iter() {
                prop_assert_eq!(Some(steps), model.get(name));
            }
        }
    }
}
