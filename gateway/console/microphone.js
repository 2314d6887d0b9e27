// The microphone as 16 kHz mono float32 frames (an AudioWorklet: capture-worklet.js), for the
// Live page's stream and the Speakers page's recordings.

export const SAMPLE_RATE = 16000; // what the gateway's stream and the models take
const FRAME_MS = 100; // per WebSocket message: within the gateway's 2 s, small enough for latency

export class Microphone {
  // onFrame(Float32Array, level) for each frame, in order.
  constructor(onFrame) {
    this.onFrame = onFrame;
    this.stream = null;
    this.context = null;
    this.node = null;
    this.stopped = null;
  }

  async start() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this browser gives no microphone here (it needs HTTPS, or localhost)");
    }
    // The recogniser wants the sound as it is: no echo cancelling, noise suppression or gain.
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    let source;
    try {
      this.context = new AudioContext({ sampleRate: SAMPLE_RATE });
      source = this.context.createMediaStreamSource(this.stream);
    } catch {
      // Some browsers (Firefox) connect a microphone only to a context at its own rate: the
      // worklet then resamples.
      if (this.context) await this.context.close();
      this.context = new AudioContext();
      source = this.context.createMediaStreamSource(this.stream);
    }
    await this.context.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
    this.node = new AudioWorkletNode(this.context, "tritonasr-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      processorOptions: { targetRate: SAMPLE_RATE, frameSamples: (SAMPLE_RATE * FRAME_MS) / 1000 },
    });
    this.flushed = null;
    this.node.port.onmessage = ({ data }) => {
      if (data.flushed) {
        if (this.flushed) this.flushed();
        return;
      }
      if (data.frame.length) this.onFrame(data.frame, data.level);
    };
    source.connect(this.node);
    // (The node outputs silence; connected so that every browser keeps pulling it.)
    this.node.connect(this.context.destination);
    await this.context.resume();
  }

  // Posts what the worklet holds (the last, short frame), then releases the microphone; no frame
  // follows once this resolves. Idempotent.
  stop() {
    if (!this.stopped) this.stopped = this.release();
    return this.stopped;
  }

  async release() {
    if (this.node) {
      const flushed = new Promise((resolve) => {
        this.flushed = resolve;
      });
      this.node.port.postMessage("flush");
      await Promise.race([flushed, new Promise((resolve) => setTimeout(resolve, 500))]);
      this.node.port.onmessage = null;
      this.node.disconnect();
    }
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.context) await this.context.close();
    this.stream = this.context = this.node = null;
  }
}
