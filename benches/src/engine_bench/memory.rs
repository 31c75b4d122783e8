//! The memory side of the run: how fast this machine streams memory while the benchmark runs,
//! and how many weight bytes one decode step must read, which together bound single-stream
//! decode from above (the roofline the report sets the measured decode against).
//!
//! Single-stream decode of a small quantized model is memory-bound: every step reads every
//! weight once (the tied embedding included, as the LM head) and does little arithmetic per
//! byte. On a shared host the bandwidth left to this machine varies from minute to minute, so a
//! decode figure alone cannot be compared across runs; the fraction of the roofline measured in
//! the same run can.

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use serde::Serialize;

use super::EngineBenchError;

/// Read bandwidth measured by [`read_bandwidth`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bandwidth {
    /// Bytes per second over the best pass, in GB/s (10^9 bytes).
    pub gb_s: f64,
    /// Threads that read concurrently (the engine's thread count).
    pub threads: usize,
    /// Size of the buffer read in each pass, bytes (larger than the last-level cache).
    pub bytes: usize,
}

/// Passes over the buffer; the best one counts (the others absorb page faults and wake-ups).
const PASSES: usize = 3;

/// Reads a `bytes`-long buffer `PASSES` times, `threads` threads each summing its own contiguous
/// share (one share per thread, like a matmul task reading its weight rows), and returns the
/// best pass's bytes per second. The buffer is written first, so every page is real memory
/// rather than the shared zero page.
pub fn read_bandwidth(threads: usize, bytes: usize) -> Bandwidth {
    let threads = threads.max(1);
    let words = (bytes / 8).max(threads);
    let data: Vec<u64> = (0..words as u64).collect();
    let share = words.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..PASSES {
        let start = Instant::now();
        std::thread::scope(|s| {
            for part in data.chunks(share) {
                s.spawn(move || std::hint::black_box(sum(part)));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    Bandwidth {
        gb_s: (words * 8) as f64 / best.max(f64::MIN_POSITIVE) / 1e9,
        threads,
        bytes: words * 8,
    }
}

/// Wrapping sum with four independent chains, so the loop is limited by loads, not by one
/// chain of adds.
fn sum(part: &[u64]) -> u64 {
    let mut acc = [0u64; 4];
    let mut quads = part.chunks_exact(4);
    for q in &mut quads {
        for (a, &v) in acc.iter_mut().zip(q) {
            *a = a.wrapping_add(v);
        }
    }
    let tail = quads
        .remainder()
        .iter()
        .fold(0u64, |a, &v| a.wrapping_add(v));
    acc.iter().fold(tail, |a, &v| a.wrapping_add(v))
}

/// Bytes of tensor data in a GGUF file: what one decode step reads, since every weight
/// matrix (and the tied embedding, as the LM head) is streamed once per step.
pub fn weight_bytes(model: &Path) -> Result<u64, EngineBenchError> {
    let path = model.to_path_buf();
    let mut file = std::fs::File::open(model).map_err(|source| EngineBenchError::Io {
        path: path.clone(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|source| EngineBenchError::Gguf { path, source })?;
    let mut total = 0u64;
    for info in content.tensor_infos.values() {
        let dtype = info.ggml_dtype;
        let blocks = info.shape.elem_count() / dtype.block_size();
        total += (blocks * dtype.type_size()) as u64;
    }
    Ok(total)
}

/// The single-stream decode ceiling: steps per second if a step did nothing but read `weights`
/// bytes at `gb_s`.
pub fn decode_roofline(gb_s: f64, weights: u64) -> f64 {
    match weights {
        0 => 0.0,
        w => gb_s * 1e9 / w as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_adds_every_word() {
        let words: Vec<u64> = (1..=11).collect();
        assert_eq!(sum(&words), 66);
        assert_eq!(sum(&[u64::MAX, 2]), 1);
    }

    #[test]
    fn bandwidth_reports_the_buffer_it_read() {
        let b = read_bandwidth(2, 1 << 20);
        assert_eq!((b.threads, b.bytes), (2, 1 << 20));
        assert!(b.gb_s.is_finite() && b.gb_s > 0.0, "{b:?}");
    }

    #[test]
    fn roofline_is_bandwidth_over_bytes() {
        assert_eq!(decode_roofline(20.0, 100_000_000), 200.0);
        assert_eq!(decode_roofline(20.0, 0), 0.0);
    }
}
