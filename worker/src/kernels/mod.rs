//! CPU kernels: SIMD quantized matrix products and paged attention.
