use candle_core::Device;
use orchard_worker::model::gguf::{self, default_model_path};
fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .collect::<Vec<_>>()
        .join(" ")
}
fn main() {
    println!("start {}", rss());
    let m = gguf::load(&default_model_path(), &Device::Cpu).unwrap();
    println!("loaded {}", rss());
    drop(m.content);
    println!("content dropped {}", rss());
    drop(m.model);
    println!("model dropped {}", rss());
}
