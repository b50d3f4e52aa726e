"""megatron-core models: the Llama-family GPTModel with GEM attention (llama), the HF <->
megatron-core state-dict mapping (hf_mapping), checkpoint I/O and conversions (checkpoint_io,
convert), and process-group set-up (runtime). Importing this package imports no megatron-core."""
