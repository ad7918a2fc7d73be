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
#[derive(Clone, Debug, Default)]
pub struct Interner {
    /// Coins, protocols, chains.
    names: [FastMap<Box<str>, (KeyId, u64)>; 3],
    next: u32,
}

impl Interner {
    /// The number and route of `key`, numbering it if new. Past 2³² − 1 keys, new keys go
    /// without a number (found by name).
    pub fn intern(&mut self, key: Key<'_>) -> (KeyId, u64) {
        let (kind, name) = match key {
            Key::Coin(s) => (0, s),
            Key::Protocol(s) => (1, s),
            Key::Chain(s) => (2, s),
        };
        if let Some(found) = self.names[kind].get(name) {
            return *found;
        }
        let id = if self.next == u32::MAX {
            KeyId::NONE
        } else {
            self.next += 1;
            KeyId(self.next - 1)
        };
        let found = (id, key.hash());
        self.names[kind].insert(name.into(), found);
        found
    }

    /// Distinct keys numbered.
    pub fn len(&self) -> usize {
        self.names.iter().map(FastMap::len).sum()
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
fn prefetch_value<T>(value: &T) {
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
