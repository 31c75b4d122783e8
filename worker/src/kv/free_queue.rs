//! LRU queue of free KV blocks, after vLLM v1 `FreeKVCacheBlockQueue`.
//!
//! An intrusive doubly linked list over block ids: O(1) `popleft`, `append` and, crucially,
//! `remove` from the middle, which a prefix-cache hit on a free block needs. Freed blocks go to
//! the tail and allocation takes from the head, so the least recently freed block is evicted
//! first.

/// Sentinel for "no neighbour".
const NIL: u32 = u32::MAX;

/// Free block ids in eviction order (head = next to evict).
#[derive(Debug, Clone)]
pub struct FreeQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    in_queue: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    /// Creates a queue holding every block `0..num_blocks` in id order, as a fresh pool is.
    pub fn new(num_blocks: u32) -> Self {
        let n = num_blocks as usize;
        let mut q = Self {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            in_queue: vec![false; n],
            head: NIL,
            tail: NIL,
            len: 0,
        };
        for id in 0..num_blocks {
            q.append(id);
        }
        q
    }

    /// Number of free blocks; allocation can succeed only up to this many.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no block is free.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `id` is currently free (so a cache hit on it must take it out of the queue).
    pub fn contains(&self, id: u32) -> bool {
        self.in_queue.get(id as usize).copied().unwrap_or(false)
    }

    /// Takes the least recently freed block, the one eviction should reuse first.
    pub fn popleft(&mut self) -> Option<u32> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.remove(id);
        Some(id)
    }

    /// Puts a just-freed block at the tail (most recently used end). Ignores ids already queued
    /// or out of range, so the list can never be corrupted by a double free.
    pub fn append(&mut self, id: u32) {
        let i = id as usize;
        if i >= self.in_queue.len() || self.in_queue[i] {
            return;
        }
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.next[self.tail as usize] = id;
        }
        self.tail = id;
        self.in_queue[i] = true;
        self.len += 1;
    }

    /// Unlinks `id` from anywhere in the queue; returns whether it was queued.
    pub fn remove(&mut self, id: u32) -> bool {
        if !self.contains(id) {
            return false;
        }
        let i = id as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.in_queue[i] = false;
        self.len -= 1;
        true
    }

    /// Free block ids from head (next evicted) to tail; for metrics and tests.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let id = cur;
            cur = self.next[id as usize];
            Some(id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{ensure, Result};

    fn ids(q: &FreeQueue) -> Vec<u32> {
        q.iter().collect()
    }

    #[test]
    fn new_queue_holds_all_blocks_in_order() -> Result<()> {
        let q = FreeQueue::new(4);
        ensure!(q.len() == 4);
        ensure!(ids(&q) == vec![0, 1, 2, 3]);
        Ok(())
    }

    #[test]
    fn popleft_append_remove_keep_lru_order() -> Result<()> {
        let mut q = FreeQueue::new(5);
        ensure!(q.popleft() == Some(0));
        ensure!(q.popleft() == Some(1));
        ensure!(ids(&q) == vec![2, 3, 4]);
        q.append(0);
        ensure!(ids(&q) == vec![2, 3, 4, 0]);
        ensure!(q.remove(3));
        ensure!(ids(&q) == vec![2, 4, 0]);
        ensure!(!q.remove(3), "removing twice must report absence");
        ensure!(q.remove(2), "remove head");
        ensure!(q.remove(0), "remove tail");
        ensure!(ids(&q) == vec![4]);
        q.append(1);
        ensure!(ids(&q) == vec![4, 1]);
        ensure!(q.len() == 2);
        Ok(())
    }

    #[test]
    fn double_append_and_empty_pop_are_harmless() -> Result<()> {
        let mut q = FreeQueue::new(2);
        q.append(1);
        q.append(7);
        ensure!(ids(&q) == vec![0, 1]);
        ensure!(q.popleft() == Some(0));
        ensure!(q.popleft() == Some(1));
        ensure!(q.popleft().is_none());
        ensure!(q.is_empty());
        Ok(())
    }
}
