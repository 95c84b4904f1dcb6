"""I/O: lazy safetensors index, PEFT adapter reader, base-model headers, streaming writer."""
