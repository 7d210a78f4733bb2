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

{{/* metadata.annotations of an object: commonAnnotations under its own (a dict, may be empty),
or nothing when both are empty. */}}
{{- define "openshell.annotations" -}}
{{- $root := index . 0 -}}
{{- $all := merge (deepCopy (index . 1 | default dict)) ($root.Values.commonAnnotations | default dict) -}}
{{- with $all -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
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

{{/* The sandbox pods' ServiceAccount: sandboxes.pod.serviceAccountName, or FULLNAME-sandbox, which the
chart creates. The gateway takes supervisor pod tokens of this ServiceAccount only. */}}
{{- define "openshell.sandboxServiceAccountName" -}}
{{- default (printf "%s-sandbox" (include "openshell.fullname" . | trunc 55 | trimSuffix "-")) .Values.sandboxes.pod.serviceAccountName -}}
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

{{/* REPOSITORY@DIGEST, or REPOSITORY:TAG (tag defaulting to the appVersion), the repository moved
to global.imageRegistry when that is set (openshell.registryImage). */}}
{{- define "openshell.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- $repository := include "openshell.registryImage" (list $image.repository $root) -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
An image reference (repository, or a whole reference with its tag or digest) with its registry
replaced by global.imageRegistry, when that is set. The first path component is the registry when
it has a dot or a port or is localhost (the rule container runtimes use); without one the image is
Docker Hub's, whose one-component names live under library/. So a mirror that keeps the upstream
paths needs that one setting: ghcr.io/openshell/openshell-gateway becomes
MIRROR/openshell/openshell-gateway and busybox:1.36 MIRROR/library/busybox:1.36.
*/}}
{{- define "openshell.registryImage" -}}
{{- $reference := index . 0 -}}
{{- $registry := (index . 1).Values.global.imageRegistry | default "" | trimSuffix "/" -}}
{{- if not $registry -}}
{{- $reference -}}
{{- else -}}
{{- $parts := splitList "/" $reference -}}
{{- $first := first $parts -}}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) -}}
{{- $parts = rest $parts -}}
{{- else if eq (len $parts) 1 -}}
{{- $parts = prepend $parts "library" -}}
{{- end -}}
{{- printf "%s/%s" $registry (join "/" $parts) -}}
{{- end -}}
{{- end -}}

{{/*
The names of pull Secrets: global.imagePullSecrets and then the given list (each item a name or
{name: NAME}), duplicates dropped, as a JSON list (fromJsonArray turns it back into one).
*/}}
{{- define "openshell.pullSecretNames" -}}
{{- $root := index . 0 -}}
{{- $names := list -}}
{{- range concat ($root.Values.global.imagePullSecrets | default list) (index . 1 | default list) -}}
{{- if kindIs "map" . }}{{ $names = append $names .name }}{{ else }}{{ $names = append $names . }}{{ end -}}
{{- end -}}
{{- $names | uniq | toJson -}}
{{- end -}}

{{/* The imagePullSecrets of a pod spec (global.imagePullSecrets and the given list), or nothing. */}}
{{- define "openshell.imagePullSecrets" -}}
{{- with include "openshell.pullSecretNames" . | fromJsonArray -}}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
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
{{- if and .Values.auth.oidc.caBundle.secretName .Values.auth.oidc.caBundle.configMapName -}}
{{- fail "auth.oidc.caBundle: set secretName or configMapName, not both" -}}
{{- end -}}
{{- if and (include "openshell.oidcCaVolume" .) (not .Values.auth.oidc.issuerUrl) -}}
{{- fail "auth.oidc.caBundle is set but auth.oidc.issuerUrl is empty: the CA is for the OIDC issuer" -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- if and (not .Values.tls.existingSecret) (not .Values.tls.certManager.enabled) -}}
{{- fail "tls.enabled needs tls.existingSecret (a Secret with tls.crt and tls.key) or tls.certManager.enabled" -}}
{{- end -}}
{{- end -}}
{{- if not (or .Values.auth.oidc.issuerUrl .Values.auth.allowUnauthenticatedApi) -}}
{{- if and .Values.gatewayApi.enabled .Values.gatewayApi.httpRoute.enabled -}}
{{- fail "gatewayApi.httpRoute.enabled without auth.oidc.issuerUrl would route the UNAUTHENTICATED HTTP API (every caller admin: creates and deletes sandboxes) to whoever reaches the Gateway: set auth.oidc.issuerUrl (or, unsafely, auth.allowUnauthenticatedApi=true)" -}}
{{- end -}}
{{- if and .Values.ingress.enabled .Values.ingress.http.enabled -}}
{{- fail "ingress.http.enabled without auth.oidc.issuerUrl would route the UNAUTHENTICATED HTTP API (every caller admin: creates and deletes sandboxes) to whoever reaches the Ingress controller: set auth.oidc.issuerUrl (or, unsafely, auth.allowUnauthenticatedApi=true)" -}}
{{- end -}}
{{- if and .Values.gateway.service.exposeApi (include "openshell.external" .) -}}
{{- fail "gateway.service.exposeApi without auth.oidc.issuerUrl would publish the UNAUTHENTICATED HTTP API (every caller admin: creates and deletes sandboxes) on the external Service: set auth.oidc.issuerUrl (or, unsafely, auth.allowUnauthenticatedApi=true)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled .Values.networkPolicy.sandboxes.enabled (not .Values.networkPolicy.sandboxes.allowEgressWithoutTo) -}}
{{- range $i, $rule := .Values.networkPolicy.sandboxes.egress -}}
{{- if not $rule.to -}}
{{- fail (printf "networkPolicy.sandboxes.egress[%d] has no `to`: it would let sandboxes reach ANY address on its ports, the cloud metadata address and every pod and Service of the cluster included. Name its peers in `to`; for the internet on some ports use networkPolicy.sandboxes.internet (enabled, ports), which excepts metadataCidrs and clusterCidrs; networkPolicy.sandboxes.allowEgressWithoutTo=true overrides this, unsafely" $i) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef (name and kind of a cert-manager Issuer or ClusterIssuer)" -}}
{{- end -}}
{{- if .Values.networkPolicy.enabled -}}
{{- if and .Values.monitoring.serviceMonitor.enabled (not .Values.networkPolicy.metricsFrom) -}}
{{- fail "networkPolicy.enabled with monitoring.serviceMonitor.enabled needs networkPolicy.metricsFrom: the peers (e.g. the Prometheus namespace) allowed to scrape /metrics on the ops port 7090; without them the NetworkPolicy blocks the scrapes" -}}
{{- end -}}
{{- if and (include "openshell.external" .) (not .Values.networkPolicy.grpcFrom) -}}
{{- fail "networkPolicy.enabled with gateway.service.type NodePort or LoadBalancer needs networkPolicy.grpcFrom: the clients (e.g. an ipBlock) of the external Service; without them the NetworkPolicy blocks them" -}}
{{- end -}}
{{- if and (include "openshell.ingressPorts" .) (not .Values.networkPolicy.ingressFrom) -}}
{{- fail "networkPolicy.enabled with ingress.enabled needs networkPolicy.ingressFrom: the peers (e.g. the Ingress controller's namespace) whose pods forward the Ingresses' traffic; without them the NetworkPolicy blocks it" -}}
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

{{/*
Refuses to create a cluster object (kind, name) that exists already and is not this release's, with
a message naming the setting that stops the chart creating it. Helm's lookup sees the cluster on
install and upgrade (and `--dry-run=server`); under `helm template` and client-side dry runs it
finds nothing, so there Helm's own "exists and cannot be imported" error remains.
*/}}
{{- define "openshell.refuseForeign" -}}
{{- $root := index . 0 -}}
{{- $kind := index . 2 -}}
{{- $name := index . 3 -}}
{{- $found := lookup (index . 1) $kind "" $name -}}
{{- if $found -}}
{{- $annotations := $found.metadata.annotations | default dict -}}
{{- if not (and (eq (get $annotations "meta.helm.sh/release-name") $root.Release.Name) (eq (get $annotations "meta.helm.sh/release-namespace") $root.Release.Namespace)) -}}
{{- fail (printf "the %s %q exists already and is not this release's: %s" $kind $name (index . 4)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The container ports the Ingresses route to (space separated), empty when none. */}}
{{- define "openshell.ingressPorts" -}}
{{- $ingress := .Values.ingress -}}
{{- if $ingress.enabled -}}
{{- $ports := list -}}
{{- if $ingress.grpc.enabled }}{{ $ports = append $ports "7070" }}{{ end -}}
{{- if $ingress.http.enabled }}{{ $ports = append $ports "7080" }}{{ end -}}
{{- join " " $ports -}}
{{- end -}}
{{- end -}}

{{/* The pod securityContext: gateway.podSecurityContext without its null keys. */}}
{{- define "openshell.podSecurityContext" -}}
{{- $context := dict -}}
{{- /* On OpenShift the SCC assigns the ids from the namespace's range (and refuses others): the
       gateway, the migration Job and the helm test pods alike leave them out. */ -}}
{{- $assigned := ternary (list "runAsUser" "runAsGroup" "fsGroup") list .Values.openshift.enabled -}}
{{- range $key, $value := .Values.gateway.podSecurityContext -}}
{{- if and (not (kindIs "invalid" $value)) (not (has $key $assigned)) -}}
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
{{- $settings := deepCopy $sup.settings -}}
{{- $supervisor := dict
      "image" (include "openshell.image" (list $sup.image .))
      "pull_policy" $sup.pullPolicy
      "injection" $sup.injection
      "tmp_size_limit" $sup.tmpSizeLimit
      "journal_size_limit" $sup.journalSizeLimit
      "settings" $settings
      "init_resources" (dict "requests" $sup.initResources.requests "limits" $sup.initResources.limits) -}}
{{- /* Supervisors speak TLS to a TLS gateway, verified against the TLS Secret's ca.crt, which the
       driver publishes in the sandbox namespace for the sandbox pods to mount (docs/helm.md). */ -}}
{{- if $v.tls.enabled }}{{ $_ := set $supervisor "gateway_ca_file" "/etc/openshell/tls/ca.crt" }}{{ end -}}
{{- if $sup.metrics.enabled }}{{ $_ := set $supervisor "metrics_port" (int $sup.metrics.port) }}{{ end -}}
{{- $podcfg := dict
      "image_pull_policy" $pod.imagePullPolicy
      "image_pull_secrets" (include "openshell.pullSecretNames" (list . $pod.imagePullSecrets) | fromJsonArray)
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
{{- /* Always named: unset, the gateway would take tokens of the namespace's default ServiceAccount,
       which any pod of the namespace runs as. */ -}}
{{- $_ := set $podcfg "service_account_name" (include "openshell.sandboxServiceAccountName" .) -}}
{{- with $pod.runtimeClassName }}{{ $_ := set $podcfg "runtime_class_name" . }}{{ end -}}
{{- with $pod.priorityClassName }}{{ $_ := set $podcfg "priority_class_name" . }}{{ end -}}
{{- $oidc := $v.auth.oidc -}}
{{- $oidccfg := dict
      "issuer_url" $oidc.issuerUrl
      "audience" $oidc.audience
      "role_claims" $oidc.roleClaims
      "roles" $oidc.roles
      "username_claim" $oidc.usernameClaim
      "team_claim" $oidc.teamClaim
      "team_prefix" $oidc.teamPrefix
      "allowed_clients" $oidc.allowedClients
      "allow_insecure_issuer" $oidc.allowInsecureIssuer
      "cli_client_id" $oidc.cliClientId -}}
{{- if include "openshell.oidcCaVolume" . }}{{ $_ := set $oidccfg "ca_file" (printf "%s/%s" (include "openshell.oidcCaDir" .) $oidc.caBundle.key) }}{{ end -}}
{{- $sa := $v.auth.supervisors -}}
{{- $auth := dict
      "oidc" $oidccfg
      "supervisors" (dict
        "required" $sa.required
        "kubernetes_audience" $sa.kubernetesAudience
        "kubernetes_token_expiry_s" $sa.kubernetesTokenExpirySeconds
        "token_ttl_s" $sa.tokenTtlSeconds) -}}
{{- /* Without OIDC the API takes no tokens: it listens on loopback (port-forward only), unless the
       operator explicitly opens it unauthenticated (the NOTES warn). */ -}}
{{- $httpListen := "0.0.0.0:7080" -}}
{{- if not $oidc.issuerUrl -}}
{{- if $v.auth.allowUnauthenticatedApi -}}
{{- $_ := set $auth "allow_unauthenticated_api" true -}}
{{- else -}}
{{- $httpListen = "127.0.0.1:7080" -}}
{{- end -}}
{{- end -}}
{{- $tls := dict -}}
{{- $httpTls := dict -}}
{{- if $v.tls.enabled -}}
{{- $dir := "/etc/openshell/tls" -}}
{{- $tls = dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir) -}}
{{- $httpTls = deepCopy $tls -}}
{{- /* mTLS on the API only: sandbox pods have no client certificate (their identity is the pod token). */ -}}
{{- if $v.tls.clientAuth }}{{ $_ := set $httpTls "client_ca_file" (printf "%s/ca.crt" $dir) }}{{ end -}}
{{- end -}}
{{- $config := dict
      "grpc" (dict "listen" "0.0.0.0:7070" "shutdown_grace_s" $v.gateway.grpc.shutdownGraceSeconds "hello_timeout_s" $v.gateway.grpc.helloTimeoutSeconds "tls" $tls)
      "http" (dict "listen" $httpListen "tls" $httpTls)
      "ops" (dict "listen" "0.0.0.0:7090")
      "auth" $auth
      "database" $database
      "drain" (dict
        "settle_s" $v.gateway.drain.settleSeconds
        "window_s" (include "openshell.drainWindowSeconds" . | float64)
        "max_hints_per_s" $v.gateway.drain.maxHintsPerSecond
        "min_hints_per_s" (min $v.gateway.drain.maxHintsPerSecond 20))
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
      "ha" (dict "leader" (dict "lease_name" (include "openshell.leaderLease" .) "namespace" .Release.Namespace))
      "log_level" $v.gateway.logLevel
      "log_format" $v.gateway.logFormat -}}
{{- $merged := mustMergeOverwrite $config (deepCopy $v.gateway.extraConfig) -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* The leader Lease's name (ha.leader.lease_name): one per release, in the release's namespace. */}}
{{- define "openshell.leaderLease" -}}
{{- printf "%s-leader" (include "openshell.gateway.fullname" .) -}}
{{- end -}}

{{/* "secret" or "configMap" when the OIDC issuer's CA comes from an existing object, else empty. */}}
{{- define "openshell.oidcCaVolume" -}}
{{- $ca := .Values.auth.oidc.caBundle -}}
{{- if $ca.secretName }}secret{{ else if $ca.configMapName }}configMap{{ end -}}
{{- end -}}

{{- define "openshell.oidcCaDir" -}}/etc/openshell/oidc-ca{{- end -}}

{{/* The Secret the gateway's TLS files come from (tls.enabled). */}}
{{- define "openshell.tlsSecret" -}}
{{- default (printf "%s-tls" (include "openshell.gateway.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* "true" when the gateway is published by a Service of type NodePort or LoadBalancer. */}}
{{- define "openshell.external" -}}
{{- if ne .Values.gateway.service.type "ClusterIP" -}}true{{- end -}}
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

{{/*
The drain's window, seconds: gateway.drain.windowSeconds, or the deprecated gateway.drainSeconds
when it is set (it was a preStop sleep; its time now goes to the drain). Its 0 meant "no preStop
sleep", a valid value in older values files (as was a negative one), and is no window: it leaves drain.windowSeconds.
*/}}
{{- define "openshell.drainWindowSeconds" -}}
{{- $g := .Values.gateway -}}
{{- if or (kindIs "invalid" $g.drainSeconds) (le (int $g.drainSeconds) 0) -}}{{ $g.drain.windowSeconds }}{{- else -}}{{ $g.drainSeconds }}{{- end -}}
{{- end -}}
