//! Orchard benchmarks: the `orchard-bench` load generator and offline engine benchmarks.
