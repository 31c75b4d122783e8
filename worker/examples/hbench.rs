use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use orchard_worker::kernels::q8_0::Q8_0Matrix;
use orchard_worker::kernels::team::Team;
use std::time::Instant;
fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rows: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let team = Team::new(threads, "hb").unwrap();
    let w = Tensor::randn(0f32, 1.0, (rows, 576), &Device::Cpu).unwrap();
    let head = Q8_0Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
    let x: Vec<f32> = (0..576).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0f32; rows];
    let iters = (20_000_000 / rows).max(3);
    for _ in 0..3 {
        let s = Instant::now();
        team.install(|| {
            for _ in 0..iters {
                head.matmul(&x, 1, &mut out)
            }
        });
        let t = s.elapsed().as_secs_f64() / iters as f64;
        println!(
            "rows {rows} threads {threads}: {:.1} us, {:.1} GB/s",
            t * 1e6,
            (rows * 18 * 34) as f64 / t / 1e9
        );
    }
}
