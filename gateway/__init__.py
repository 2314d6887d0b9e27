"""The HTTP and WebSocket gateway (`tritonasr gateway`): what programs that speak HTTP, and
browsers, use instead of Triton's gRPC tensors. Stateless: any number of replicas run behind a
plain HTTP balancer, each reaching Triton through the client library (TLS, the caller's API key).

- app: the ASGI application, its limits, access and errors
- transcriptions: OpenAI's `POST /v1/audio/transcriptions`
- streams: `WS /v1/stream`, our live protocol (docs/websocket-stream.md)
- funasr: FunASR's runtime WebSocket protocol at `/` (docs/funasr-protocol.md)
- offline: whole recordings to asr_offline, bounded in number
- access: API keys; request_ids: the id each request and socket is logged by
- settings, errors, cli
"""
