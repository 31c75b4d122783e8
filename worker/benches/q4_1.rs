//! Q4_1 matmul: Orchard's AVX2 kernel versus candle's `QMatMul` (scalar Q4_1 vec_dot on x86).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use orchard_worker::kernels::q4_1::Q4_1Matrix;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    for &(t, k, n) in &[
        (1usize, 576usize, 1536usize),
        (1, 1536, 576),
        (16, 576, 1536),
    ] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).expect("weights");
        let x = Tensor::randn(0f32, 1.0, (t, k), &dev).expect("activations");
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
        let ours = Q4_1Matrix::from_qtensor(&qt).expect("repack");
        let theirs = QMatMul::from_qtensor(qt).expect("qmatmul");
        let xs = x.flatten_all().and_then(|x| x.to_vec1::<f32>()).expect("x");
        let mut out = vec![0f32; t * n];
        let mut g = c.benchmark_group(format!("q4_1_t{t}_k{k}_n{n}"));
        g.bench_function("orchard", |b| {
            b.iter(|| ours.matmul(black_box(&xs), t, black_box(&mut out)))
        });
        g.bench_function("candle", |b| {
            b.iter(|| theirs.forward(black_box(&x)).expect("forward"))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
