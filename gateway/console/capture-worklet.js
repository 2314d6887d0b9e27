// AudioWorklet processor: the microphone's first channel (or the mix of its channels) as
// Float32Array frames of `frameSamples` samples at `targetRate`, posted to the page with their
// RMS level. `sampleRate` is the AudioContext's (a global of the worklet scope): the page makes
// the context at 16 kHz where the browser allows it; otherwise the audio is decimated here by
// averaging each output sample's span of input (a box filter: enough for speech into a
// 16 kHz recogniser, which hears nothing above 8 kHz).

class CaptureProcessor extends AudioWorkletProcessor {
  constructor({ processorOptions }) {
    super();
    this.frameSamples = processorOptions.frameSamples;
    this.step = sampleRate / processorOptions.targetRate; // input samples per output sample
    this.frame = new Float32Array(this.frameSamples);
    this.filled = 0;
    this.sum = 0; // of the input samples of the output sample being made
    this.count = 0;
    this.phase = 0;
    this.port.onmessage = ({ data }) => {
      if (data === "flush") {
        this.post(this.frame.subarray(0, this.filled).slice());
        this.filled = 0;
        this.port.postMessage({ flushed: true });
      }
    };
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // not connected yet
    const length = channels[0].length;
    for (let i = 0; i < length; i++) {
      let value = 0;
      for (const channel of channels) value += channel[i];
      value /= channels.length;
      if (this.step === 1) {
        this.push(value);
        continue;
      }
      this.sum += value;
      this.count += 1;
      this.phase += 1;
      if (this.phase >= this.step) {
        this.push(this.sum / this.count);
        this.phase -= this.step;
        this.sum = 0;
        this.count = 0;
      }
    }
    return true;
  }

  push(value) {
    // The gateway refuses samples outside [-1, 1]: a clipping microphone is clipped here.
    this.frame[this.filled++] = Math.max(-1, Math.min(1, value));
    if (this.filled === this.frameSamples) {
      this.post(this.frame);
      this.frame = new Float32Array(this.frameSamples);
      this.filled = 0;
    }
  }

  post(frame) {
    let energy = 0;
    for (const x of frame) energy += x * x;
    const level = frame.length ? Math.sqrt(energy / frame.length) : 0;
    this.port.postMessage({ frame, level }, [frame.buffer]);
  }
}

registerProcessor("tritonasr-capture", CaptureProcessor);
