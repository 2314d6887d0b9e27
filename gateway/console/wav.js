// WAV files of mono float samples: 32-bit float (exactly the samples a stream sent) or 16-bit
// PCM (half the size, for enrollment uploads).

export function wavBlob(chunks, sampleRate, format = "pcm16") {
  const count = chunks.reduce((n, chunk) => n + chunk.length, 0);
  const bytesPerSample = format === "float32" ? 4 : 2;
  const dataBytes = count * bytesPerSample;
  const view = new DataView(new ArrayBuffer(44 + dataBytes));
  const text = (offset, value) => [...value].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + dataBytes, true);
  text(8, "WAVE");
  text(12, "fmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, format === "float32" ? 3 : 1, true); // WAVE_FORMAT_IEEE_FLOAT or PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, sampleRate, true);
  view.setUint32(28, sampleRate * bytesPerSample, true);
  view.setUint16(32, bytesPerSample, true);
  view.setUint16(34, bytesPerSample * 8, true);
  text(36, "data");
  view.setUint32(40, dataBytes, true);
  let offset = 44;
  for (const chunk of chunks) {
    for (const x of chunk) {
      if (format === "float32") view.setFloat32(offset, x, true);
      else view.setInt16(offset, Math.round(Math.max(-1, Math.min(1, x)) * 32767), true);
      offset += bytesPerSample;
    }
  }
  return new Blob([view.buffer], { type: "audio/wav" });
}

export function durationMs(chunks, sampleRate) {
  return (chunks.reduce((n, chunk) => n + chunk.length, 0) * 1000) / sampleRate;
}
