"""The deployment's configuration files, shipped as package data (`tritonasr.paths.deploy_files`):
Prometheus's scrape config, Grafana's provisioning and the tritonasr dashboard, the TLS script."""
