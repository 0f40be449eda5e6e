"""Other ecosystems' model formats: the Hugging Face Llama layout (`hf_llama`) and GGUF (`gguf_llama`).

Edge modules: they import `safetensors` / `gguf` inside their functions only, so the core (model, engines,
loop, generator) runs without those packages; `pip install -e ".[hf]"` brings them.
"""
