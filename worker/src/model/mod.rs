//! Model code (candle style): Llama-family decoders from GGUF and safetensors.
