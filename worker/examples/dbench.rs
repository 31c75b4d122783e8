use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use orchard_worker::kernels::q4_1::{Q4_1Matrix, Q8_1Activations};
use orchard_worker::kernels::q8_0::Q8_0Matrix;
use orchard_worker::kernels::team::Team;
use std::time::Instant;

fn q4(n: usize, k: usize) -> Q4_1Matrix {
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    Q4_1Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap()
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);

    let team = Team::new(threads, "db").unwrap();
    let shapes: Vec<(usize, usize)> = if std::env::var("BIG").is_ok() {
        vec![(4608, 576), (576, 1536)]
    } else {
        vec![(960, 576), (576, 576), (3072, 576), (576, 1536)]
    };
    let proto: Vec<Q4_1Matrix> = shapes.iter().map(|&(n, k)| q4(n, k)).collect();
    let layers: Vec<Vec<Q4_1Matrix>> = (0..30).map(|_| proto.clone()).collect();
    let head = {
        let w = Tensor::randn(0f32, 1.0, (49152, 576), &Device::Cpu).unwrap();
        Q8_0Matrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap()
    };
    let x576: Vec<f32> = (0..576).map(|i| (i as f32 * 0.37).sin()).collect();
    let x1536: Vec<f32> = (0..1536).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0f32; 4608];
    let mut logits = vec![0f32; 49152];
    let bytes_q4: f64 = shapes
        .iter()
        .map(|&(n, k)| (n * k / 32 * 20) as f64)
        .sum::<f64>()
        * 30.0;
    let bytes_head = (49152 * 576 / 32 * 34) as f64;
    for round in 0..6 {
        let iters = 40;
        let (mut tq, mut th) = (0f64, 0f64);
        team.install(|| {
            for _ in 0..iters {
                let s = Instant::now();
                for l in &layers {
                    for m in l {
                        let x = if m.k() == 576 { &x576 } else { &x1536 };
                        let act = Q8_1Activations::quantize(x, 1, m.k());
                        m.matmul_q8(&act, &mut out[..m.n_out()]);
                    }
                }
                let s2 = Instant::now();
                head.matmul(&x576, 1, &mut logits);
                tq += (s2 - s).as_secs_f64();
                th += s2.elapsed().as_secs_f64();
            }
        });
        let (tq, th) = (tq / iters as f64, th / iters as f64);
        println!(
            "round {round}: q4_1 layers {:.3} ms ({:.1} GB/s), head {:.3} ms ({:.1} GB/s), sum {:.3} ms -> {:.0} tok/s ceiling",
            tq * 1e3, bytes_q4 / tq / 1e9, th * 1e3, bytes_head / th / 1e9, (tq + th) * 1e3, 1.0 / (tq + th)
        );
    }
}
