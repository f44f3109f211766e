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

{{/* Images: repository:tag, repository@digest or repository:tag@digest. Takes
(dict "image" IMAGE "default" DEFAULT_TAG). */}}
{{- define "electron-serve.imageRef" -}}
{{- $i := .image }}
{{- if and $i.digest $i.tag }}
{{- printf "%s:%s@%s" $i.repository $i.tag $i.digest }}
{{- else if $i.digest }}
{{- printf "%s@%s" $i.repository $i.digest }}
{{- else }}
{{- printf "%s:%s" $i.repository (default .default $i.tag) }}
{{- end }}
{{- end }}

{{- define "electron-serve.routerImage" -}}
{{- include "electron-serve.imageRef" (dict "image" .Values.image.router "default" .Chart.AppVersion) }}
{{- end }}

{{/* The Ray head's image: the serving generation's worker image. With upgradeStrategy None a
running head keeps the image it started with; every generation runs the same Ray (checked). */}}
{{- define "electron-serve.workerImage" -}}
{{- include "electron-serve.imageRef" (dict "image" .Values.image.worker "default" .Chart.AppVersion) }}
{{- end }}

{{/* The images pin one Ray (pyproject.toml, the Chart's electron-serve/ray-version); the
RayCluster's rayVersion must say the same, or KubeRay's autoscaler runs another Ray. */}}
{{- define "electron-serve.checkVersions" -}}
{{- $pinned := index .Chart.Annotations "electron-serve/ray-version" }}
{{- if ne (toString .Values.ray.version) $pinned }}
{{- fail (printf "ray.version %s differs from the Ray the images pin (%s, pyproject.toml): the RayCluster's rayVersion must be the images' Ray" (toString .Values.ray.version) $pinned) }}
{{- end }}
{{- end }}

{{/* The worker generations, oldest first: workers.previous (while it is replaced) and the
serving one (workers.generation). Each has its worker groups, worker ConfigMap and (unless
draining) its controller. */}}
{{- define "electron-serve.generations" -}}
{{- $w := .Values.workers }}
{{- $gens := list }}
{{- $prev := $w.previous | default dict }}
{{- if $prev.generation }}
{{- if eq $prev.generation $w.generation }}
{{- fail "workers.previous.generation must differ from workers.generation: a new image or worker-side setting is a new generation" }}
{{- end }}
{{- /* What the previous generation ran, as given: its image (the repository and pull policy
default to the current one's, never its tag or digest) and engine settings over the chart's
defaults (not over the current generation's, which would change what it runs). */}}
{{- $image := mergeOverwrite (dict "repository" .Values.image.worker.repository "tag" "" "digest" ""
  "pullPolicy" .Values.image.worker.pullPolicy) (deepCopy ($prev.image | default dict)) }}
{{- $given := $prev.engine | default dict }}
{{- $engine := mergeOverwrite (include "electron-serve.engineDefaults" . | fromYaml) (deepCopy $given) }}
{{- if hasKey $given "kv_cache_bytes" }}
{{- $_ := set $engine "kv_cache_bytes" $given.kv_cache_bytes }}
{{- end }}
{{- $gens = append $gens (dict "name" $prev.generation "image" $image
  "modelPath" ($prev.modelPath | default .Values.model.path) "engine" $engine
  "draining" ($prev.draining | default false) "current" false) }}
{{- end }}
{{- $gens = append $gens (dict "name" $w.generation "image" .Values.image.worker
  "modelPath" .Values.model.path "engine" .Values.engine "draining" false "current" true) }}
{{- toYaml (dict "generations" $gens) }}
{{- end }}

{{/* values.yaml's `engine` (templates cannot read values.yaml itself): what a previous
generation's engine settings are given over. A chart test keeps the two equal. */}}
{{- define "electron-serve.engineDefaults" -}}
dtype: auto
device: auto
gpu_memory_fraction: 0.85
kv_cache_bytes: null
{{- end }}

{{/* Pod settings shared by every component: takes the component's values. */}}
{{- define "electron-serve.podSettings" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end }}

{{/* The init container that copies the model onto its volume (model.fetch), in the pods
that read it: routers (the tokenizer) and GPU workers. */}}
{{- define "electron-serve.modelFetch" -}}
{{- $f := .Values.model.fetch }}
{{- if $f.enabled }}
{{- if eq .Values.model.volume.type "none" }}
{{- fail "model.fetch needs a model volume to copy into (model.volume.type pvc, emptyDir or hostPath)" }}
{{- end }}
- name: model-fetch
  image: {{ required "model.fetch.image is required when model.fetch.enabled" $f.image }}
  {{- with $f.command }}
  command:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $f.args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    - {name: HOME, value: /tmp}
    - {name: MODEL_DIR, value: {{ .Values.model.volume.mountPath | quote }}}
    {{- with $f.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $f.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: tmp, mountPath: /tmp}
    - {name: model, mountPath: {{ .Values.model.volume.mountPath }}}
{{- end }}
{{- end }}

{{/* Where the Ray head's GCS listens (KubeRay's head Service). */}}
{{- define "electron-serve.rayHead" -}}
{{- printf "%s-head-svc.%s.svc:6379" (include "electron-serve.fullname" .) .Release.Namespace }}
{{- end }}

{{/* Ray custom resource that only one generation's worker group of a pool offers:
(dict "pool" NAME "generation" NAME). */}}
{{- define "electron-serve.poolResource" -}}
{{- printf "electron_pool_%s_%s" .pool .generation }}
{{- end }}

{{/* Where the controller says its first worker serves (cluster.ready_file; its probes). */}}
{{- define "electron-serve.readyFile" -}}
/tmp/electron-serve-workers-ready
{{- end }}

{{/* Whether the chart runs the schema migrations in a hook Job (a database is configured). */}}
{{- define "electron-serve.migrationJob" -}}
{{- if and .Values.migrations.enabled .Values.postgresql.enabled }}true{{ end }}
{{- end }}

{{/* The routers' config: what routers read (router, auth, tenancy with plans and prices,
observability, the model path for the tokenizer, pool names and fallbacks). Its checksum
rolls the routers only. */}}
{{- define "electron-serve.routerConfig" -}}
{{- $c := include "electron-serve.config" . | fromYaml }}
{{- $pools := list }}
{{- range $c.autoscaler.pools }}
{{- $pools = append $pools (dict "name" .name "fallback_to_shared" .fallback_to_shared) }}
{{- end }}
{{- $_ := set $c "autoscaler" (dict "pools" $pools) }}
{{- $_ = set $c "engine" (dict "model" $c.engine.model) }}
{{- $_ = set $c "cluster" (omit $c.cluster "num_gpus_per_worker" "num_cpus_per_worker" "workers" "worker_port") }}
{{- $_ = set $c.tenancy "migrate_on_start" (not (include "electron-serve.migrationJob" .)) }}
{{- toYaml $c }}
{{- end }}

{{/* A worker generation's config, for its controller and the worker actors it starts:
engine, cluster, autoscaler, observability, and of the router section the model id and
registry poll only (no tenancy, no auth). Takes (dict "root" $ "gen" GENERATION). Its
checksum restarts that generation's controller only. */}}
{{- define "electron-serve.workerConfig" -}}
{{- $root := .root }}
{{- $gen := .gen }}
{{- $c := include "electron-serve.config" $root | fromYaml }}
{{- $c = omit $c "tenancy" "auth" }}
{{- $_ := set $c "router" (pick $c.router "model_id" "registry_poll_s") }}
{{- /* The generation's engine settings and model; `config.engine` overrides every generation. */}}
{{- $overrides := $root.Values.config.engine | default dict }}
{{- $engine := mergeOverwrite (merge (dict "model" $gen.modelPath) (deepCopy $gen.engine)) (deepCopy $overrides) }}
{{- $_ = set $engine "model" ($overrides.model | default $gen.modelPath) }}
{{- /* null is meaningful (on GPU: a fraction of free memory) but Helm drops null values and
merges skip them: absent means null here, as in values.yaml. */}}
{{- if hasKey $overrides "kv_cache_bytes" }}
{{- $_ = set $engine "kv_cache_bytes" $overrides.kv_cache_bytes }}
{{- else }}
{{- $_ = set $engine "kv_cache_bytes" (index $gen.engine "kv_cache_bytes") }}
{{- end }}
{{- $_ = set $c "engine" $engine }}
{{- $_ = set $c.cluster "start_timeout_s" (int $root.Values.workers.startTimeoutSeconds) }}
{{- $_ = set $c.cluster "ready_file" (include "electron-serve.readyFile" $root) }}
{{- /* Its worker actors are named after the generation: a restarted controller adopts its
own generation's live workers, never another's (cluster/fleet.py). */}}
{{- $_ = set $c.cluster "fleet" $gen.name }}
{{- $pools := list }}
{{- range $c.autoscaler.pools }}
{{- $pools = append $pools (merge (dict "resources" (dict (include "electron-serve.poolResource" (dict "pool" .name "generation" $gen.name)) 1)) (omit . "resources")) }}
{{- end }}
{{- $_ = set $c.autoscaler "pools" $pools }}
{{- toYaml $c }}
{{- end }}

{{/* The whole service config (core/config.py), as YAML: split into the routers' and each
worker generation's above. */}}
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
  "target_requests_per_worker" (int ($t.requestsPerWorker | default 16))) }}
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
  "router" (dict "host" "0.0.0.0" "port" (int .Values.router.port) "metrics_port" (int .Values.metrics.routerPort) "model_id" .Values.model.id "policy" .Values.router.policy "drain_timeout_s" (int .Values.router.maxStreamSeconds))
  "auth" (dict "enabled" .Values.auth.enabled)
  "tenancy" (dict "plans" (.Values.plans | default dict)
               "sqlite_path" (printf "%s/electron.db" (include "electron-serve.stateDir" .))
               "spool_path" (printf "%s/ledger-spool.jsonl" (include "electron-serve.stateDir" .)))
  "observability" (dict "log_format" .Values.logs.format
                     "worker_metrics_port" (int .Values.metrics.workerPort))
  "cluster" (dict "namespace" "electron" "pool" "default" "workers" 0
              "worker_port" (int .Values.workers.grpcPort)
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

{{- define "electron-serve.clusterTokenSecretName" -}}
{{- default (printf "%s-cluster-token" (include "electron-serve.fullname" .)) .Values.clusterToken.existingSecret }}
{{- end }}

{{/* cluster.token for the routers and the controllers (which hand it to their worker
actors): from a Secret, never inlined. */}}
{{- define "electron-serve.clusterTokenEnv" -}}
- name: ELECTRON_CLUSTER__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "electron-serve.clusterTokenSecretName" . }}
      key: {{ ternary .Values.clusterToken.existingSecretKey "cluster-token" (ne .Values.clusterToken.existingSecret "") }}
{{- end }}

{{/* The router's secrets, as the config's own environment variables
(ELECTRON_<SECTION>__<FIELD>, core/config.py): tenancy.redis_url, tenancy.database_url and
auth.admin_key come from Secrets through secretKeyRef, never inlined; so does cluster.token. */}}
{{- define "electron-serve.secretEnv" -}}
{{ include "electron-serve.clusterTokenEnv" . }}
{{- if .Values.auth.enabled }}
- name: ELECTRON_AUTH__ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "electron-serve.adminSecretName" . }}
      key: {{ ternary .Values.auth.existingSecretKey "admin-key" (ne .Values.auth.existingSecret "") }}
{{- end }}
{{- if and .Values.redis.enabled (or .Values.redis.deploy .Values.redis.url .Values.redis.existingSecret) }}
- name: ELECTRON_TENANCY__REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "electron-serve.datastoreSecretName" .) .Values.redis.existingSecret }}
      key: {{ ternary .Values.redis.existingSecretKey "redis-url" (ne .Values.redis.existingSecret "") }}
{{- end }}
{{- include "electron-serve.databaseEnv" . }}
{{- end }}

{{/* tenancy.database_url for the routers and the migration Job. An in-chart PostgreSQL
whose password is in an existing Secret: the URL is composed by the kubelet from that
Secret ($(ELECTRON_POSTGRES_PASSWORD)), so the password is never in the chart's output. */}}
{{- define "electron-serve.databaseEnv" -}}
{{- $pg := .Values.postgresql }}
{{- if and $pg.enabled $pg.deploy $pg.existingPasswordSecret }}
- name: ELECTRON_POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $pg.existingPasswordSecret }}
      key: {{ $pg.existingPasswordSecretKey }}
- name: ELECTRON_TENANCY__DATABASE_URL
  value: {{ printf "postgresql://%s:$(ELECTRON_POSTGRES_PASSWORD)@%s-postgresql:5432/%s" $pg.username (include "electron-serve.fullname" .) $pg.database | quote }}
{{- else if and $pg.enabled (or $pg.deploy $pg.url $pg.existingSecret) }}
- name: ELECTRON_TENANCY__DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "electron-serve.datastoreSecretName" .) $pg.existingSecret }}
      key: {{ ternary $pg.existingSecretKey "database-url" (ne $pg.existingSecret "") }}
{{- end }}
{{- end }}

{{/* Refuses to render a datastore nobody chose: production uses external ones; the in-chart
single instances (not HA) and running without are explicit switches. */}}
{{- define "electron-serve.checkDatastores" -}}
{{- $r := .Values.redis }}
{{- if and $r.enabled (not (or $r.deploy $r.url $r.existingSecret)) }}
{{- fail "redis: set redis.url or redis.existingSecret (an external Redis: production), or redis.deploy=true (a single in-chart Redis, not HA: trials), or redis.enabled=false (no Redis: each router replica limits on its own)" }}
{{- end }}
{{- if and (gt (int .Values.router.processes) 1) (not $r.enabled) }}
{{- fail "router.processes > 1 needs Redis (redis.enabled): the router processes of a pod share the tenants' limits through it" }}
{{- end }}
{{- $pg := .Values.postgresql }}
{{- if and $pg.enabled $pg.deploy (eq $pg.username "postgres") }}
{{- fail "postgresql.username: \"postgres\" is the in-chart PostgreSQL's bootstrap superuser; the service's role must be another (it is made without superuser rights)" }}
{{- end }}
{{- if and $pg.enabled (not (or $pg.deploy $pg.url $pg.existingSecret)) }}
{{- fail "postgresql: set postgresql.url or postgresql.existingSecret (an external database: production), or postgresql.deploy=true (a single in-chart PostgreSQL, not HA: trials), or postgresql.enabled=false (no database: each router pod its own SQLite, one replica only)" }}
{{- end }}
{{- end }}

{{/* A secret the chart generates: refused when secrets.generate is false (GitOps). */}}
{{- define "electron-serve.generated" -}}
{{- if not .root.Values.secrets.generate }}
{{- fail (printf "%s: secrets.generate is false (GitOps renders cannot read a generated secret back): give it or name an existing Secret" .what) }}
{{- end }}
{{- .value }}
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
{{- $fetch := .Values.model.fetch.enabled }}
{{- with .Values.model.volume }}
{{- if eq .type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ include "electron-serve.modelClaim" $ }}
    {{- if not $fetch }}
    readOnly: true
    {{- end }}
{{- else if eq .type "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.volume.hostPath is required for type hostPath" .hostPath }}
    type: {{ ternary "DirectoryOrCreate" "Directory" $fetch }}
{{- else if eq .type "emptyDir" }}
- name: model
  emptyDir:
    {{- with .sizeLimit }}
    sizeLimit: {{ . }}
    {{- else }}
    {}
    {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "electron-serve.modelClaim" -}}
{{- if .Values.model.volume.create.enabled }}
{{- printf "%s-models" (include "electron-serve.fullname" .) }}
{{- else }}
{{- required "model.volume.claimName is required for type pvc (or model.volume.create.enabled)" .Values.model.volume.claimName }}
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
{{/* Joins this pod to the Ray cluster as a node that offers no CPU or GPU (routers,
controllers). `ray start` runs without the pod's secrets in its environment (env -u): the
raylet it leaves behind, and every process that raylet spawns, inherit that environment,
while the router process (exec'd after it) keeps them. */}}
{{- define "electron-serve.joinRay" -}}
env -u ELECTRON_AUTH__ADMIN_KEY -u ELECTRON_TENANCY__DATABASE_URL -u ELECTRON_TENANCY__REDIS_URL -u ELECTRON_POSTGRES_PASSWORD -u ELECTRON_CLUSTER__TOKEN ray start --address={{ include "electron-serve.rayHead" . }} --num-cpus=0 --num-gpus=0 --disable-usage-stats
{{- range $flag, $port := include "electron-serve.rayPorts" . | fromYaml }} --{{ $flag }}={{ $port }}{{ end }}
{{- end }}

{{/* The ports of every Ray node (head, worker pods, routers, controllers), pinned (as
`ray start` flags and rayStartParams) so the NetworkPolicies can name them; Ray's worker
processes take one port each of min-worker-port..max-worker-port. */}}
{{- define "electron-serve.rayPorts" -}}
node-manager-port: 6380
object-manager-port: 6381
runtime-env-agent-port: 6382
dashboard-agent-grpc-port: 6383
dashboard-agent-listen-port: 52365
metrics-export-port: 8080
min-worker-port: 10002
max-worker-port: 19999
{{- end }}

{{/* The pods that are Ray nodes: the head, the worker pods, routers and controllers. */}}
{{- define "electron-serve.rayNodeSelector" -}}
matchLabels:
  {{- include "electron-serve.selectorLabels" . | nindent 2 }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values: [ray-head, ray-worker, router, controller]
{{- end }}

{{/* The same ports as rayStartParams (strings). */}}
{{- define "electron-serve.rayStartPorts" -}}
{{- range $flag, $port := include "electron-serve.rayPorts" . | fromYaml }}
{{ $flag }}: {{ $port | quote }}
{{- end }}
{{- end }}

{{- define "electron-serve.rayAuthSecretName" -}}
{{- default (printf "%s-ray-auth" (include "electron-serve.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{/* Ray's token auth for every Ray process (ray.auth): RAY_AUTH_MODE and the token from a
Secret, never inlined. */}}
{{- define "electron-serve.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "electron-serve.rayAuthSecretName" . }}
      key: {{ ternary .Values.ray.auth.existingSecretKey "auth_token" (ne .Values.ray.auth.existingSecret "") }}
{{- end }}
{{- end }}

{{/* "true" when the head's GCS is fault tolerant (ray.gcsFaultTolerance; unset: on when the
chart deploys its own Redis), else empty. Fails when it is on with no Redis to use. */}}
{{- define "electron-serve.gcsFaultTolerance" -}}
{{- $ft := .Values.ray.gcsFaultTolerance }}
{{- $inChart := and .Values.redis.enabled .Values.redis.deploy }}
{{- $on := ternary $inChart $ft.enabled (kindIs "invalid" $ft.enabled) }}
{{- if $on }}
{{- if not (or $ft.redisAddress $inChart) }}
{{- fail "ray.gcsFaultTolerance.enabled needs a Redis: set ray.gcsFaultTolerance.redisAddress (host:port of an external, highly available Redis; its password in ray.gcsFaultTolerance.existingSecret) or redis.deploy=true" }}
{{- end }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/* The RayCluster's spec.gcsFaultToleranceOptions (KubeRay >= 1.3), when it is on. */}}
{{- define "electron-serve.gcsFaultToleranceOptions" -}}
{{- $ft := .Values.ray.gcsFaultTolerance }}
redisAddress: {{ $ft.redisAddress | default (printf "%s-redis:6379" (include "electron-serve.fullname" .)) | quote }}
{{- if or $ft.existingSecret (not $ft.redisAddress) }}
redisPassword:
  valueFrom:
    secretKeyRef:
      name: {{ $ft.existingSecret | default (include "electron-serve.datastoreSecretName" .) }}
      key: {{ ternary $ft.existingSecretKey "redis-password" (ne $ft.existingSecret "") }}
{{- end }}
{{- with $ft.externalStorageNamespace }}
externalStorageNamespace: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Ray nodes outside KubeRay's pods (routers and controllers run `ray start` themselves):
with GCS fault tolerance their raylets wait for a restarted head's GCS as long as KubeRay
makes its worker pods wait (600 s), not Ray's default 60 s, after which a raylet exits and
takes its pod's process with it. */}}
{{- define "electron-serve.gcsReconnectEnv" -}}
{{- if include "electron-serve.gcsFaultTolerance" . }}
- name: RAY_gcs_rpc_server_reconnect_timeout_s
  value: "600"
{{- end }}
{{- end }}

{{/* The in-chart Redis password (requirepass): the value, else the one already deployed,
else new (stable within one render, cached on the root context). */}}
{{- define "electron-serve.redisPassword" -}}
{{- if .Values.redis.password }}
{{- .Values.redis.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "electron-serve.datastoreSecretName" .) }}
{{- if and $existing (hasKey $existing.data "redis-password") }}
{{- index $existing.data "redis-password" | b64dec }}
{{- else }}
{{- if not (hasKey .Release "electronRedisPassword") }}
{{- $_ := set .Release "electronRedisPassword" (include "electron-serve.generated" (dict "root" . "what" "redis.password" "value" (randAlphaNum 32))) }}
{{- end }}
{{- .Release.electronRedisPassword }}
{{- end }}
{{- end }}
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
{{- $_ := set .Release "electronPostgresPassword" (include "electron-serve.generated" (dict "root" . "what" "postgresql.password" "value" (randAlphaNum 32))) }}
{{- end }}
{{- .Release.electronPostgresPassword }}
{{- end }}
{{- end }}
{{- end }}
