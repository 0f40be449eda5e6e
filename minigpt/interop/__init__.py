"""Other ecosystems' model formats: the Hugging Face Llama layout (`hf_llama`) and GGUF (`gguf_llama`), with
what they share (`common`: `InteropError`, the export helpers and the format registry `launch/export.py` uses).

Edge modules: they import `safetensors` / `gguf` inside their functions only, so the core (model, engines,
loop, generator) runs without those packages; `pip install -e ".[hf]"` brings them.
"""
