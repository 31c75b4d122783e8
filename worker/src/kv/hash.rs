//! Block hashing for prefix caching, following vLLM v1 `kv_cache_utils.hash_block_tokens`.
//!
//! A full block's hash covers its parent's hash, its token ids and any extra keys (for example a
//! LoRA adapter id or a cache salt), so equal hashes mean equal *prefixes*, not just equal blocks.
//! We use 64-bit FNV-1a rather than std's `DefaultHasher` because its output is specified and
//! therefore stable across Rust versions and processes, which a cache key shared with a router
//! needs to be.

/// Hash of one full KV block, chained through its parent so it identifies the whole prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Seed used in place of a parent hash for the first block, so "no parent" differs from any
/// real parent value we are likely to produce.
const ROOT_SEED: u64 = 0x6f72_6368_6172_6421;

/// Incremental FNV-1a over little-endian words.
struct Fnv(u64);

impl Fnv {
    fn write_u64(&mut self, v: u64) {
        for b in v.to_le_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }
}

/// Hashes one full block: `hash(parent, tokens, extra_keys)`.
///
/// Lengths are mixed in so that moving a value between `tokens` and `extra_keys` cannot collide.
pub fn hash_block_tokens(
    parent: Option<BlockHash>,
    tokens: &[u32],
    extra_keys: &[u64],
) -> BlockHash {
    let mut h = Fnv(FNV_OFFSET);
    h.write_u64(parent.map_or(ROOT_SEED, |p| p.0));
    h.write_u64(tokens.len() as u64);
    for &t in tokens {
        h.write_u64(u64::from(t));
    }
    h.write_u64(extra_keys.len() as u64);
    for &k in extra_keys {
        h.write_u64(k);
    }
    BlockHash(h.0)
}

/// Hashes every full block of `tokens` as a chain; a trailing partial block is not hashed.
///
/// Returns one hash per full block, each depending on all blocks before it.
pub fn hash_request_tokens(
    block_size: usize,
    tokens: &[u32],
    extra_keys: &[u64],
) -> Vec<BlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let h = hash_block_tokens(parent, chunk, extra_keys);
            parent = Some(h);
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{ensure, Result};

    #[test]
    fn hash_is_deterministic_and_depends_on_tokens() -> Result<()> {
        let a = hash_block_tokens(None, &[1, 2, 3], &[]);
        ensure!(a == hash_block_tokens(None, &[1, 2, 3], &[]));
        ensure!(a != hash_block_tokens(None, &[1, 2, 4], &[]));
        Ok(())
    }

    #[test]
    fn hash_depends_on_parent() -> Result<()> {
        let p1 = hash_block_tokens(None, &[1, 2], &[]);
        let p2 = hash_block_tokens(None, &[3, 4], &[]);
        ensure!(
            hash_block_tokens(Some(p1), &[5, 6], &[]) != hash_block_tokens(Some(p2), &[5, 6], &[])
        );
        ensure!(hash_block_tokens(None, &[5, 6], &[]) != hash_block_tokens(Some(p1), &[5, 6], &[]));
        Ok(())
    }

    #[test]
    fn extra_keys_change_hash() -> Result<()> {
        let plain = hash_block_tokens(None, &[1, 2], &[]);
        let lora = hash_block_tokens(None, &[1, 2], &[7]);
        ensure!(plain != lora);
        ensure!(lora != hash_block_tokens(None, &[1, 2], &[8]));
        // A value cannot "move" from tokens to extra keys and collide.
        ensure!(hash_block_tokens(None, &[1, 2, 7], &[]) != hash_block_tokens(None, &[1, 2], &[7]));
        Ok(())
    }

    #[test]
    fn request_hashes_only_full_blocks_and_chain() -> Result<()> {
        let tokens: Vec<u32> = (0..10).collect();
        let hashes = hash_request_tokens(4, &tokens, &[]);
        ensure!(
            hashes.len() == 2,
            "10 tokens / 4 = 2 full blocks, got {}",
            hashes.len()
        );
        ensure!(hashes[0] == hash_block_tokens(None, &tokens[0..4], &[]));
        ensure!(hashes[1] == hash_block_tokens(Some(hashes[0]), &tokens[4..8], &[]));
        Ok(())
    }
}
