{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "layerwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-layerwatch unless the release name already has it. */}}
{{- define "layerwatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "layerwatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "layerwatch.labels" -}}
helm.sh/chart: {{ include "layerwatch.chart" . }}
{{ include "layerwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: layerwatch
{{- end }}

{{- define "layerwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "layerwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "layerwatch.sidecarSelectorLabels" -}}
{{ include "layerwatch.selectorLabels" . }}
app.kubernetes.io/component: sidecar
{{- end }}

{{- define "layerwatch.redisSelectorLabels" -}}
{{ include "layerwatch.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "layerwatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "layerwatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "layerwatch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "layerwatch.modelName" -}}
{{- required "model.name is required: the served model's name, equal to the tap's LAYERWATCH_TAP_MODEL_NAME" .Values.model.name }}
{{- end }}

{{/* The Redis URL Secret (name and key) the sidecars and the tap env read. */}}
{{- define "layerwatch.redisSecretName" -}}
{{- if and .Values.redis.existingSecret (not .Values.redis.bundled.enabled) }}
{{- .Values.redis.existingSecret }}
{{- else }}
{{- printf "%s-redis-url" (include "layerwatch.fullname" .) }}
{{- end }}
{{- end }}

{{- define "layerwatch.redisSecretKey" -}}
{{- if and .Values.redis.existingSecret (not .Values.redis.bundled.enabled) }}
{{- .Values.redis.existingSecretKey }}
{{- else }}
{{- print "url" }}
{{- end }}
{{- end }}

{{/* The Redis URL when the chart knows it (bundled or given); fails when there is none. */}}
{{- define "layerwatch.redisUrl" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "%s://%s-redis.%s.svc:6379/0" (ternary "rediss" "redis" .Values.redis.tls.enabled) (include "layerwatch.fullname" .) .Release.Namespace }}
{{- else if .Values.redis.url }}
{{- if not (regexMatch "^rediss?://" .Values.redis.url) }}
{{- fail "redis.url must start with redis:// or rediss://" }}
{{- end }}
{{- if and .Values.redis.tls.enabled (not (hasPrefix "rediss://" .Values.redis.url)) }}
{{- fail "redis.tls.enabled needs a rediss:// redis.url" }}
{{- end }}
{{- if and .Values.redis.auth.existingSecret (regexMatch "^rediss?://[^/]*@" .Values.redis.url) }}
{{- fail "redis.url carries a password and redis.auth.existingSecret is set: keep the password only in the Secret" }}
{{- end }}
{{- .Values.redis.url }}
{{- else if not .Values.redis.existingSecret }}
{{- fail "no Redis: set redis.url, redis.existingSecret, or redis.bundled.enabled=true" }}
{{- end }}
{{- end }}

{{/* Exactly one lens bundle source. */}}
{{- define "layerwatch.bundleSource" -}}
{{- $sources := list }}
{{- if .Values.bundle.existingClaim }}{{ $sources = append $sources "existingClaim" }}{{ end }}
{{- if .Values.bundle.image.repository }}{{ $sources = append $sources "image" }}{{ end }}
{{- if .Values.bundle.configMap }}{{ $sources = append $sources "configMap" }}{{ end }}
{{- if ne (len $sources) 1 }}
{{- fail (printf "set exactly one lens bundle source (bundle.existingClaim, bundle.image.repository or bundle.configMap); got %d: %v" (len $sources) $sources) }}
{{- end }}
{{- first $sources }}
{{- end }}

{{- define "layerwatch.vllmSelectorLabels" -}}
{{ include "layerwatch.selectorLabels" . }}
app.kubernetes.io/component: vllm
{{- end }}

{{- define "layerwatch.vllmImage" -}}
{{- printf "%s:%s" .Values.vllm.image.repository (default .Chart.AppVersion .Values.vllm.image.tag) }}
{{- end }}

{{/* Name of the vLLM pods' container port serving the tap's metrics (a tapPodMonitor endpoint). */}}
{{- define "layerwatch.vllmTapPortName" -}}
tap-metrics
{{- end }}

{{/* Where the sampling key Secret is mounted, and the file the tap reads. */}}
{{- define "layerwatch.samplingKeyDir" -}}
/run/layerwatch/sampling
{{- end }}

{{- define "layerwatch.samplingKeyFile" -}}
{{- printf "%s/%s" (include "layerwatch.samplingKeyDir" .) .Values.tap.samplingKey.key }}
{{- end }}

{{/* Redis credentials: the Secret holding the password (user-provided or generated for the
bundled Redis), or empty when Redis needs none (an external Redis without auth.existingSecret). */}}
{{- define "layerwatch.redisAuthSecret" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else if .Values.redis.bundled.enabled }}
{{- printf "%s-redis-auth" (include "layerwatch.fullname" .) }}
{{- end }}
{{- end }}

{{/* Where the Redis credentials and TLS files are mounted (sidecars, vLLM server, your taps). */}}
{{- define "layerwatch.redisAuthDir" -}}
/run/layerwatch/redis
{{- end }}

{{- define "layerwatch.redisTlsDir" -}}
/run/layerwatch/redis-tls
{{- end }}

{{- define "layerwatch.redisTlsSecret" -}}
{{- if .Values.redis.tls.enabled }}
{{- required "redis.tls.existingSecret is required with redis.tls.enabled: a Secret with the CA (and the certificate and key)" .Values.redis.tls.existingSecret }}
{{- end }}
{{- end }}

{{/* The redis section of the settings as environment variables; $prefix is LAYERWATCH_ or
LAYERWATCH_TAP_ (a "KEY: value" map, rendered by the caller as env or stringData). */}}
{{- define "layerwatch.redisFileSettings" -}}
{{- $ctx := index . 0 }}
{{- $prefix := index . 1 }}
{{- $v := $ctx.Values.redis }}
{{- if include "layerwatch.redisAuthSecret" $ctx }}
{{ $prefix }}REDIS__PASSWORD_FILE: {{ printf "%s/%s" (include "layerwatch.redisAuthDir" $ctx) $v.auth.passwordKey | quote }}
{{- if $v.auth.usernameKey }}
{{ $prefix }}REDIS__USERNAME_FILE: {{ printf "%s/%s" (include "layerwatch.redisAuthDir" $ctx) $v.auth.usernameKey | quote }}
{{- end }}
{{- end }}
{{- if $v.tls.enabled }}
{{ $prefix }}REDIS__TLS_CA_FILE: {{ printf "%s/%s" (include "layerwatch.redisTlsDir" $ctx) $v.tls.caKey | quote }}
{{- if $v.tls.clientCertificates }}
{{ $prefix }}REDIS__TLS_CERT_FILE: {{ printf "%s/%s" (include "layerwatch.redisTlsDir" $ctx) $v.tls.certKey | quote }}
{{ $prefix }}REDIS__TLS_KEY_FILE: {{ printf "%s/%s" (include "layerwatch.redisTlsDir" $ctx) $v.tls.keyKey | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volume mounts and volumes of the Redis credentials and TLS Secrets (read-only, 0400). */}}
{{- define "layerwatch.redisVolumeMounts" -}}
{{- if include "layerwatch.redisAuthSecret" . }}
- name: redis-auth
  mountPath: {{ include "layerwatch.redisAuthDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.enabled }}
- name: redis-tls
  mountPath: {{ include "layerwatch.redisTlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "layerwatch.redisVolumes" -}}
{{- $auth := include "layerwatch.redisAuthSecret" . }}
{{- if $auth }}
- name: redis-auth
  secret:
    secretName: {{ $auth }}
    defaultMode: 0440
    items:
      - key: {{ .Values.redis.auth.passwordKey }}
        path: {{ .Values.redis.auth.passwordKey }}
      {{- with .Values.redis.auth.usernameKey }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- if .Values.redis.tls.enabled }}
- name: redis-tls
  secret:
    secretName: {{ include "layerwatch.redisTlsSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end }}
