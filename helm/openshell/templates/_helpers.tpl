{{/* Names, labels and the unified gateway config shared by the templates. */}}

{{- define "openshell.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "openshell.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The gateway's objects: FULLNAME-gateway (at most 63 characters). */}}
{{- define "openshell.gateway.fullname" -}}
{{- printf "%s-gateway" (include "openshell.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{- define "openshell.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "openshell.labels" -}}
helm.sh/chart: {{ include "openshell.chart" . }}
app.kubernetes.io/name: {{ include "openshell.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: openshell
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "openshell.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "openshell.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "openshell.gateway.labels" -}}
{{ include "openshell.labels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "openshell.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "openshell.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The sandbox namespace: sandboxes.namespace, or RELEASE-NAMESPACE-sandboxes. */}}
{{- define "openshell.sandboxNamespace" -}}
{{- default (printf "%s-sandboxes" .Release.Namespace) .Values.sandboxes.namespace -}}
{{- end -}}

{{- define "openshell.gatewayAddress" -}}
{{- if .Values.sandboxes.gatewayAddress -}}
{{- .Values.sandboxes.gatewayAddress -}}
{{- else -}}
{{- printf "%s.%s.svc:%d" (include "openshell.gateway.fullname" .) .Release.Namespace (int .Values.gateway.service.grpcPort) -}}
{{- end -}}
{{- end -}}

{{/* REPOSITORY@DIGEST, or REPOSITORY:TAG (tag defaulting to the appVersion). */}}
{{- define "openshell.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the database is the embedded SQLite file (no Secret, a sqlite URL). */}}
{{- define "openshell.sqlite" -}}
{{- if and (not .Values.database.existingSecret) (hasPrefix "sqlite" .Values.database.url) -}}true{{- end -}}
{{- end -}}

{{/* "true" when the migrations run in the hook Job rather than at the gateway's start. */}}
{{- define "openshell.migrationJob" -}}
{{- if and .Values.database.migrationJob.enabled (not (include "openshell.sqlite" .)) -}}true{{- end -}}
{{- end -}}

{{/* "true" when more than one gateway pod may run at once. */}}
{{- define "openshell.ha" -}}
{{- if or .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{- define "openshell.checks" -}}
{{- if and (include "openshell.ha" .) (include "openshell.sqlite" .) -}}
{{- fail "more than one gateway replica (gateway.replicas > 1 or gateway.autoscaling.enabled) needs a shared database: set database.existingSecret or a PostgreSQL database.url" -}}
{{- end -}}
{{- $sandboxNamespace := include "openshell.sandboxNamespace" . -}}
{{- if gt (len $sandboxNamespace) 63 -}}
{{- fail (printf "the sandbox namespace %q is longer than 63 characters: set sandboxes.namespace" $sandboxNamespace) -}}
{{- end -}}
{{- if and (eq $sandboxNamespace .Release.Namespace) (not .Values.sandboxes.allowReleaseNamespace) -}}
{{- fail (printf "sandboxes.namespace is the release namespace %q: sandboxes must not share the gateway's namespace, where they would reach its HTTP API (unauthenticated: it creates and deletes sandboxes) and sit under its Role (pods and Secrets, the database Secret's namespace included). Leave sandboxes.namespace empty (RELEASE-NAMESPACE-sandboxes) or name another namespace; sandboxes.allowReleaseNamespace=true overrides this, unsafely" .Release.Namespace) -}}
{{- end -}}
{{- if and .Values.sandboxes.createNamespace (eq $sandboxNamespace .Release.Namespace) -}}
{{- fail "sandboxes.createNamespace needs sandboxes.namespace set to a namespace other than the release namespace (set sandboxes.createNamespace=false to use an existing one)" -}}
{{- end -}}
{{- if and (not .Values.database.existingSecret) (not (hasPrefix "sqlite" .Values.database.url)) -}}
{{- fail "database.url is not SQLite: its credentials would land in ConfigMaps. Put the URL in a Secret and set database.existingSecret (and database.existingSecretKey)" -}}
{{- end -}}
{{- if .Values.networkPolicy.enabled -}}
{{- if and .Values.monitoring.serviceMonitor.enabled (not .Values.networkPolicy.metricsFrom) -}}
{{- fail "networkPolicy.enabled with monitoring.serviceMonitor.enabled needs networkPolicy.metricsFrom: the peers (e.g. the Prometheus namespace) allowed to scrape /metrics on 7080; without them the NetworkPolicy blocks the scrapes" -}}
{{- end -}}
{{- if and (include "openshell.gatewayApiPorts" .) (not .Values.networkPolicy.gatewayApiFrom) -}}
{{- fail "networkPolicy.enabled with gatewayApi.enabled needs networkPolicy.gatewayApiFrom: the peers (e.g. the Gateway implementation's namespace) whose proxies forward the routes; without them the NetworkPolicy blocks the routed traffic" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The container ports the Gateway API routes reach (space separated), empty when none. */}}
{{- define "openshell.gatewayApiPorts" -}}
{{- $api := .Values.gatewayApi -}}
{{- if $api.enabled -}}
{{- $ports := list -}}
{{- if $api.grpcRoute.enabled }}{{ $ports = append $ports "7070" }}{{ end -}}
{{- if $api.httpRoute.enabled }}{{ $ports = append $ports "7080" }}{{ end -}}
{{- join " " $ports -}}
{{- end -}}
{{- end -}}

{{/* The pod securityContext: gateway.podSecurityContext without its null keys. */}}
{{- define "openshell.podSecurityContext" -}}
{{- $context := dict -}}
{{- range $key, $value := .Values.gateway.podSecurityContext -}}
{{- if not (kindIs "invalid" $value) -}}
{{- $_ := set $context $key $value -}}
{{- end -}}
{{- end -}}
{{- with $context -}}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* The unified gateway config (gateway.yaml): docs/configuration.md has every key. */}}
{{- define "openshell.gatewayConfig" -}}
{{- $v := .Values -}}
{{- $sup := $v.sandboxes.supervisor -}}
{{- $pod := $v.sandboxes.pod -}}
{{- $database := dict "migrate_on_start" (not (include "openshell.migrationJob" .)) -}}
{{- if not $v.database.existingSecret -}}
{{- $_ := set $database "url" $v.database.url -}}
{{- end -}}
{{- $supervisor := dict
      "image" (include "openshell.image" (list $sup.image .))
      "pull_policy" $sup.pullPolicy
      "injection" $sup.injection
      "tmp_size_limit" $sup.tmpSizeLimit
      "journal_size_limit" $sup.journalSizeLimit
      "settings" $sup.settings
      "init_resources" (dict "requests" $sup.initResources.requests "limits" $sup.initResources.limits) -}}
{{- $podcfg := dict
      "image_pull_policy" $pod.imagePullPolicy
      "image_pull_secrets" $pod.imagePullSecrets
      "automount_service_account_token" $pod.automountServiceAccountToken
      "node_selector" $pod.nodeSelector
      "tolerations" $pod.tolerations
      "affinity" $pod.affinity
      "resources" (dict "requests" $pod.resources.requests "limits" $pod.resources.limits)
      "labels" $pod.labels
      "annotations" $pod.annotations
      "run_as_user" $pod.runAsUser
      "run_as_group" $pod.runAsGroup
      "fs_group" $pod.fsGroup
      "read_only_root_filesystem" $pod.readOnlyRootFilesystem
      "termination_grace_period_s" $pod.terminationGracePeriodSeconds -}}
{{- with $pod.defaultImage }}{{ $_ := set $podcfg "default_image" . }}{{ end -}}
{{- with $pod.serviceAccountName }}{{ $_ := set $podcfg "service_account_name" . }}{{ end -}}
{{- with $pod.runtimeClassName }}{{ $_ := set $podcfg "runtime_class_name" . }}{{ end -}}
{{- with $pod.priorityClassName }}{{ $_ := set $podcfg "priority_class_name" . }}{{ end -}}
{{- $config := dict
      "grpc" (dict "listen" "0.0.0.0:7070" "shutdown_grace_s" $v.gateway.grpc.shutdownGraceSeconds "hello_timeout_s" $v.gateway.grpc.helloTimeoutSeconds)
      "http" (dict "listen" "0.0.0.0:7080")
      "auth" (dict "allow_unauthenticated_api" true)
      "database" $database
      "sessions" (dict
        "heartbeat_interval_s" $v.gateway.sessions.heartbeatIntervalSeconds
        "grace_s" $v.gateway.sessions.graceSeconds
        "lost_after_s" $v.gateway.sessions.lostAfterSeconds
        "register_unknown" $v.gateway.sessions.registerUnknown)
      "drivers" (dict
        "kind" "kubernetes"
        "kubernetes" (dict
          "namespace" (include "openshell.sandboxNamespace" .)
          "gateway_address" (include "openshell.gatewayAddress" .)
          "request_timeout_s" $v.sandboxes.requestTimeoutSeconds
          "supervisor" $supervisor
          "pod" $podcfg
          "registry" (dict
            "resolve_commands" $v.sandboxes.registry.resolveCommands
            "platform" $v.sandboxes.registry.platform
            "plain_http" $v.sandboxes.registry.plainHttp
            "allowed" $v.sandboxes.registry.allowed
            "cache_ttl_s" $v.sandboxes.registry.cacheTtlSeconds)))
      "log_level" $v.gateway.logLevel
      "log_format" $v.gateway.logFormat -}}
{{- $merged := mustMergeOverwrite $config (deepCopy $v.gateway.extraConfig) -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* The database URL from the existing Secret, when there is one. */}}
{{- define "openshell.databaseEnv" -}}
{{- if .Values.database.existingSecret }}
- name: OPENSHELL_GATEWAY_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.existingSecretKey }}
{{- end }}
{{- end -}}
