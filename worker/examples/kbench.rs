use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use orchard_worker::kernels::q4_1::{Q4_1Matrix, Q8_1Activations};
use orchard_worker::kernels::team::Team;
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let team = Team::new(threads, "kb").unwrap();
    let dev = Device::Cpu;
    for &(t, k, n) in &[
        (128usize, 576usize, 3072usize),
        (128, 576, 64),
        (16, 576, 64),
        (16, 576, 3072),
        (128, 1536, 576),
        (1, 576, 3072),
        (1, 1536, 576),
    ] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (t, k), &dev).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let ours = Q4_1Matrix::from_qtensor(&qt).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![0f32; t * n];
        let act = team.install(|| Q8_1Activations::quantize(&xs, t, k));
        let iters = if t == 1 { 2000 } else { 40 };
        let mut best = f64::MAX;
        for _ in 0..5 {
            let s = Instant::now();
            team.install(|| {
                for _ in 0..iters {
                    ours.matmul_q8(&act, &mut out)
                }
            });
            best = best.min(s.elapsed().as_secs_f64() / iters as f64);
        }
        let macs = (t * k * n) as f64;
        println!(
            "t={t} k={k} n={n}: {:.3} ms  {:.1} GMAC/s  {:.1} GB/s(w)",
            best * 1e3,
            macs / best / 1e9,
            (n * k) as f64 * 0.625 / best / 1e9
        );
    }
}
