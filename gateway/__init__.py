"""The HTTP and WebSocket gateway (`tritonasr gateway`): what programs that speak HTTP, and
browsers, use instead of Triton's gRPC tensors. Any number of replicas run behind a plain HTTP
balancer, each reaching Triton through the client library (TLS, the caller's API key); their only
shared state is the jobs database (PostgreSQL when there are several).

- app: the ASGI application, its limits, access and errors
- transcriptions: OpenAI's `POST /v1/audio/transcriptions`
- streams: `WS /v1/stream`, our live protocol (docs/websocket-stream.md)
- funasr: FunASR's runtime WebSocket protocol at `/` (docs/funasr-protocol.md)
- offline: whole recordings to asr_offline, bounded in number
- jobs: batch jobs, their database (SQLAlchemy + Alembic), workers and `/v1/jobs` (docs/jobs.md)
- speakers: `/v1/speakers`, enrolled voices through the server's speaker_registry
- console: the web console's page at `GET /` and its static files (docs/console.md)
- access: API keys; request_ids: the id each request and socket is logged by
- settings, errors, cli
"""
