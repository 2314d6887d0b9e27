"""tritonasr: speech recognition served by NVIDIA Triton."""
