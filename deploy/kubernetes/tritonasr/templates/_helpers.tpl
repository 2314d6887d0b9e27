{{/* The release's name for its objects: <release>-tritonasr, or the release name when it says tritonasr already. */}}
{{- define "tritonasr.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tritonasr.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object; `component` (server, balancer, export) is added where it applies. */}}
{{- define "tritonasr.labels" -}}
{{ include "tritonasr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The servers' headless Service: its DNS name resolves to the ready server pods. */}}
{{- define "tritonasr.serversHost" -}}
{{ include "tritonasr.fullname" . }}-servers.{{ .Release.Namespace }}.svc
{{- end -}}

{{/* The balancer's Service, what callers (and the gateway) connect to. */}}
{{- define "tritonasr.balancerHost" -}}
{{ include "tritonasr.fullname" . }}.{{ .Release.Namespace }}.svc
{{- end -}}

{{/* The gateway's Service, for HTTP and WebSocket callers. */}}
{{- define "tritonasr.gatewayHost" -}}
{{ include "tritonasr.fullname" . }}-gateway.{{ .Release.Namespace }}.svc
{{- end -}}

{{- define "tritonasr.claim" -}}
{{ .Values.persistence.existingClaim | default (printf "%s-models" (include "tritonasr.fullname" .)) }}
{{- end -}}

{{/* <registry>/<name>:<tag> of one of the images docker/ builds. */}}
{{- define "tritonasr.image" -}}
{{- $root := index . 0 -}}{{- $name := index . 1 -}}
{{- $tag := $root.Values.image.tag | default $root.Chart.AppVersion -}}
{{- if $root.Values.image.registry -}}
{{ printf "%s/%s:%s" (trimSuffix "/" $root.Values.image.registry) $name $tag }}
{{- else -}}
{{ printf "%s:%s" $name $tag }}
{{- end -}}
{{- end -}}

{{- define "tritonasr.authSecret" -}}
{{ required "auth.existingSecret: name a Secret holding `api-keys` (the keys callers send, comma-separated) and optionally `admin-key`" .Values.auth.existingSecret }}
{{- end -}}

{{- define "tritonasr.tlsSecret" -}}
{{ required "tls.existingSecret: name a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt (values.yaml says which names it must hold)" .Values.tls.existingSecret }}
{{- end -}}

{{/* Pod settings shared by the GPU pods (export Job, servers). */}}
{{- define "tritonasr.gpuScheduling" -}}
{{- with .Values.gpu.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.gpu.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.gpu.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* A container that may not gain privileges or keep capabilities. */}}
{{- define "tritonasr.restrictedContainer" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}
