{{/* Names */}}
{{- define "electron-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "electron-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "electron-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "electron-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels */}}
{{- define "electron-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "electron-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "electron-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "electron-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: electron-serve
{{- end }}

{{/* Images */}}
{{- define "electron-serve.routerImage" -}}
{{- printf "%s:%s" .Values.image.router.repository (default .Chart.AppVersion .Values.image.router.tag) }}
{{- end }}

{{- define "electron-serve.workerImage" -}}
{{- printf "%s:%s" .Values.image.worker.repository (default .Chart.AppVersion .Values.image.worker.tag) }}
{{- end }}

{{/* Where the Ray head's GCS listens (KubeRay's head Service). */}}
{{- define "electron-serve.rayHead" -}}
{{- printf "%s-head-svc.%s.svc:6379" (include "electron-serve.fullname" .) .Release.Namespace }}
{{- end }}

{{/* Ray custom resource that only a pool's worker group offers. */}}
{{- define "electron-serve.poolResource" -}}
{{- printf "electron_pool_%s" . }}
{{- end }}

{{/* The service config (core/config.py), as YAML. */}}
{{- define "electron-serve.config" -}}
{{- $pools := list }}
{{- $hasShared := false }}
{{- range .Values.pools }}
{{- if eq .name "default" }}{{ $hasShared = true }}{{ end }}
{{- $t := .targets | default dict }}
{{- $pools = append $pools (dict
  "name" .name
  "min_workers" (int .minWorkers)
  "max_workers" (int .maxWorkers)
  "fallback_to_shared" (.fallbackToShared | default false)
  "target_ttft_s" ($t.ttftSeconds | default 1.0)
  "target_waiting_prefill_tokens" (int ($t.waitingPrefillTokens | default 2048))
  "target_kv_usage" ($t.kvUsage | default 0.85)
  "target_requests_per_worker" (int ($t.requestsPerWorker | default 16))
  "resources" (dict (include "electron-serve.poolResource" .name) 1)) }}
{{- end }}
{{- if not $hasShared }}
{{- fail "pools must include the shared pool, named \"default\"" }}
{{- end }}
{{- $a := .Values.autoscaling }}
{{- $engine := merge (dict "model" .Values.model.path) (deepCopy .Values.engine) }}
{{- /* null is meaningful here (on GPU: a fraction of free memory); merge drops it */}}
{{- $_ := set $engine "kv_cache_bytes" .Values.engine.kv_cache_bytes }}
{{- $config := dict
  "engine" $engine
  "router" (dict "host" "0.0.0.0" "port" (int .Values.router.port) "model_id" .Values.model.id "policy" .Values.router.policy)
  "auth" (dict "enabled" .Values.auth.enabled)
  "tenancy" (dict "plans" (.Values.plans | default dict)
               "sqlite_path" (printf "%s/electron.db" (include "electron-serve.stateDir" .))
               "spool_path" (printf "%s/ledger-spool.jsonl" (include "electron-serve.stateDir" .)))
  "observability" (dict "log_format" .Values.logs.format
                     "worker_metrics_port" (int .Values.metrics.workerPort))
  "cluster" (dict "namespace" "electron" "pool" "default" "workers" 0
              "num_gpus_per_worker" .Values.workers.gpusPerWorker
              "num_cpus_per_worker" .Values.workers.cpusPerWorker)
  "autoscaler" (dict "enabled" true "provider" "ray"
                "interval_s" $a.intervalSeconds
                "scale_up_cooldown_s" $a.scaleUpCooldownSeconds
                "scale_down_cooldown_s" $a.scaleDownCooldownSeconds
                "scale_down_delay_s" $a.scaleDownDelaySeconds
                "drain_timeout_s" $a.drainTimeoutSeconds
                "pools" $pools) }}
{{- toYaml (mustMergeOverwrite $config (deepCopy .Values.config)) }}
{{- end }}

{{/* Environment shared by every Electron Serve process (router, controller, Ray nodes). */}}
{{- define "electron-serve.env" -}}
- name: ELECTRON_CONFIG
  value: /etc/electron-serve/config.yaml
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if .Values.otel.enabled }}
- name: OTEL_SDK_DISABLED
  value: "false"
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ required "otel.endpoint is required when otel.enabled" .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_TRACES_SAMPLER
  value: {{ .Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.otel.samplerArg | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "deployment.environment=%s,k8s.namespace.name=%s%s" .Release.Name .Release.Namespace (ternary (printf ",%s" .Values.otel.resourceAttributes) "" (ne .Values.otel.resourceAttributes "")) | quote }}
{{- else }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end }}
{{- end }}

{{- define "electron-serve.adminSecretName" -}}
{{- default (printf "%s-admin" (include "electron-serve.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "electron-serve.datastoreSecretName" -}}
{{- printf "%s-datastores" (include "electron-serve.fullname" .) }}
{{- end }}

{{/* The router's secrets, as the config's own environment variables
(ELECTRON_<SECTION>__<FIELD>, core/config.py): tenancy.redis_url, tenancy.database_url and
auth.admin_key come from Secrets through secretKeyRef, never inlined. */}}
{{- define "electron-serve.secretEnv" -}}
{{- if .Values.auth.enabled }}
- name: ELECTRON_AUTH__ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "electron-serve.adminSecretName" . }}
      key: {{ ternary .Values.auth.existingSecretKey "admin-key" (ne .Values.auth.existingSecret "") }}
{{- end }}
{{- if or .Values.redis.deploy .Values.redis.url .Values.redis.existingSecret }}
- name: ELECTRON_TENANCY__REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "electron-serve.datastoreSecretName" .) .Values.redis.existingSecret }}
      key: {{ ternary .Values.redis.existingSecretKey "redis-url" (ne .Values.redis.existingSecret "") }}
{{- end }}
{{- if or .Values.postgresql.deploy .Values.postgresql.url .Values.postgresql.existingSecret }}
- name: ELECTRON_TENANCY__DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "electron-serve.datastoreSecretName" .) .Values.postgresql.existingSecret }}
      key: {{ ternary .Values.postgresql.existingSecretKey "database-url" (ne .Values.postgresql.existingSecret "") }}
{{- end }}
{{- end }}

{{/* The router's writable state (read-only root file system): the SQLite database when no
PostgreSQL is configured, and the ledger's spool while the database is down. */}}
{{- define "electron-serve.stateDir" -}}
/var/lib/electron-serve
{{- end }}

{{/* Volumes every Electron Serve pod mounts: writable /tmp (Ray's session dirs live in
/tmp/ray), the config, and the model volume when there is one. */}}
{{- define "electron-serve.volumes" -}}
- name: tmp
  emptyDir: {}
- name: config
  configMap:
    name: {{ include "electron-serve.fullname" . }}-config
{{- with .Values.model.volume }}
{{- if eq .type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.volume.claimName is required for type pvc" .claimName }}
    readOnly: true
{{- else if eq .type "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.volume.hostPath is required for type hostPath" .hostPath }}
    type: Directory
{{- end }}
{{- end }}
{{- end }}

{{- define "electron-serve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: config
  mountPath: /etc/electron-serve
  readOnly: true
{{- if ne .Values.model.volume.type "none" }}
- name: model
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Join the Ray cluster as a node that takes no work, then run an electron-serve command. */}}
{{- define "electron-serve.joinRay" -}}
ray start --address={{ include "electron-serve.rayHead" . }} --num-cpus=0 --num-gpus=0 --disable-usage-stats
{{- end }}

{{/* The in-chart PostgreSQL password: the value, else the one already deployed, else new.
Generated passwords are stable within one render (cached on the root context). */}}
{{- define "electron-serve.postgresPassword" -}}
{{- if .Values.postgresql.password }}
{{- .Values.postgresql.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "electron-serve.datastoreSecretName" .) }}
{{- if $existing }}
{{- index $existing.data "postgres-password" | b64dec }}
{{- else }}
{{- if not (hasKey .Release "electronPostgresPassword") }}
{{- $_ := set .Release "electronPostgresPassword" (randAlphaNum 32) }}
{{- end }}
{{- .Release.electronPostgresPassword }}
{{- end }}
{{- end }}
{{- end }}
