"""The tritonserver process: its command line and environment (server), the supervisor that
restarts it when a model process dies, the Grafana dashboard's metrics."""
