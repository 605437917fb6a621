{{/* Names and labels. */}}
{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tollgate.fullname" -}}
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

{{- define "tollgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of the serving pods (component "server") or the settler. */}}
{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tollgate.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
tollgate.toml from .Values.config (+ [pricebook]). Written by hand instead of toToml:
Helm reads YAML numbers as floats, and toToml would write `shards = 16.0`, which
tollgate's integer settings refuse. Nested maps and lists become inline TOML.
*/}}
{{- define "tollgate.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ . | toJson }}{{ end }}
{{- end }}

{{- define "tollgate.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{ $v | toJson }}
{{- else if kindIs "bool" $v -}}
{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- if eq (float64 $v) (floor $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if kindIs "slice" $v -}}
[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "tollgate.tomlValue" $e }}{{ end }}]
{{- else if kindIs "map" $v -}}
{ {{- range $i, $k := keys $v | sortAlpha }}{{ if $i }},{{ end }} {{ include "tollgate.tomlKey" $k }} = {{ include "tollgate.tomlValue" (get $v $k) }}{{ end }} }
{{- else if kindIs "invalid" $v -}}
{{- fail "tollgate.toml: null values are not allowed (remove the key instead)" }}
{{- else -}}
{{- fail (printf "tollgate.toml: cannot write a %s" (kindOf $v)) }}
{{- end -}}
{{- end }}

{{- define "tollgate.toml" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- /* These come from the Secret: given in values they would render into the ConfigMap. */}}
{{- range $pair := list (list "auth" "admin_token") (list "auth" "service_token") (list "redis" "url") (list "store" "url") (list "webhooks" "secret") (list "gateway" "shared_secret") (list "auth" "admin_token_previous") (list "auth" "service_token_previous") (list "webhooks" "secret_previous") (list "gateway" "shared_secret_previous") }}
{{- $table := get $config (index $pair 0) }}
{{- if and (kindIs "map" $table) (hasKey $table (index $pair 1)) }}
{{- fail (printf "config.%s.%s is a secret: put it in the Secret %s (existingSecret.keys), not in values, which render into a ConfigMap" (index $pair 0) (index $pair 1) $.Values.existingSecret.name) }}
{{- end }}
{{- end }}
{{- if .Values.pricebook }}
{{- $_ := set $config "pricebook" .Values.pricebook }}
{{- end }}
# Rendered by the tollgate chart from .Values.config and .Values.pricebook.
{{- range $section := keys $config | sortAlpha }}
{{- $table := get $config $section }}
{{- if not (kindIs "map" $table) }}
{{- fail (printf "config.%s must be a table (a map)" $section) }}
{{- end }}

[{{ include "tollgate.tomlKey" $section }}]
{{- range $key := keys $table | sortAlpha }}
{{ include "tollgate.tomlKey" $key }} = {{ include "tollgate.tomlValue" (get $table $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment shared by serve and settle: the Secret's values and the listen ports. */}}
{{- define "tollgate.env" -}}
- name: TOLLGATE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.redisUrl }}
- name: TOLLGATE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.adminToken }}
- name: TOLLGATE_SERVICE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.serviceToken }}
- name: TOLLGATE_STORE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.storeUrl }}
- name: TOLLGATE_AUTH__ADMIN_TOKEN_PREVIOUS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.adminTokenPrevious }}
      optional: true
- name: TOLLGATE_AUTH__SERVICE_TOKEN_PREVIOUS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.serviceTokenPrevious }}
      optional: true
- name: TOLLGATE_WEBHOOKS__SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.webhookSecret }}
      optional: true
- name: TOLLGATE_WEBHOOKS__SECRET_PREVIOUS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.webhookSecretPrevious }}
      optional: true
{{- /* Not in sidecar mode: the pod's own Envoy sends no shared secret, so a Secret holding
the key would refuse every check. */}}
{{- if ne .Values.mode "sidecar" }}
- name: TOLLGATE_GATEWAY__SHARED_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.gatewaySharedSecret }}
      optional: true
- name: TOLLGATE_GATEWAY__SHARED_SECRET_PREVIOUS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.keys.gatewaySharedSecretPrevious }}
      optional: true
{{- end }}
{{- /* Sidecar: only Envoy, in the same pod, talks gRPC to tollgate. */}}
- name: TOLLGATE_SERVER__GRPC_ADDR
  value: "{{ if eq .Values.mode "sidecar" }}127.0.0.1{{ else }}0.0.0.0{{ end }}:{{ .Values.ports.grpc }}"
- name: TOLLGATE_SERVER__HTTP_ADDR
  value: "0.0.0.0:{{ .Values.ports.http }}"
{{- end }}

{{/* Volumes both Deployments mount: the config, and a writable working directory. */}}
{{- define "tollgate.volumes" -}}
- name: config
  configMap:
    name: {{ include "tollgate.fullname" . }}
- name: data
  emptyDir: {}
{{- end }}

{{- define "tollgate.volumeMounts" -}}
- name: config
  mountPath: /etc/tollgate
  readOnly: true
- name: data
  mountPath: /var/lib/tollgate
{{- end }}
