"""What each model needs beside its graph: front ends (kaldi fbank, NeMo mel), model specs read from
the exported meta.json, the VAD's endpointing, TDT decoding, SenseVoice's text."""
