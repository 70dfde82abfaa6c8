{{/* Chart name, truncated to a DNS label. */}}
{{- define "dptrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "dptrain.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if hasPrefix (printf "%s-" .Release.Name) $name }}
{{- /* `helm install dptrain dptrain-operator` names things dptrain-operator, like manifests/. */}}
{{- $name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dptrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "dptrain.labels" -}}
helm.sh/chart: {{ include "dptrain.chart" . }}
{{ include "dptrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dptrain
{{- with .Values.extraLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the operator pod (immutable in the Deployment selector). */}}
{{- define "dptrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dptrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "dptrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dptrain.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dptrain.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The namespaces a namespaced operator watches (validated: non-empty). */}}
{{- define "dptrain.watchedNamespaces" -}}
{{- if eq .Values.watch.scope "namespaced" }}
{{- if not .Values.watch.namespaces }}
{{- fail "watch.namespaces must list at least one namespace when watch.scope is namespaced" }}
{{- end }}
{{- join "," (uniq .Values.watch.namespaces) }}
{{- end }}
{{- end }}

{{/*
RBAC the operator needs cluster-wide in every scope: kopf lists/watches namespaces and CRDs to
discover what to serve. Read-only.
*/}}
{{- define "dptrain.rbac.clusterRules" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/*
RBAC the operator needs where it serves jobs (all namespaces, or each watched namespace):
its own CRD and status, events, and exactly the children it creates. Secrets: `create` only (each
job's key; it can read none). No wildcards, no escalate/bind: it may grant trainers `get`/`patch` on their own job's status only because it
holds those rights itself.
*/}}
{{- define "dptrain.rbac.workloadRules" -}}
- apiGroups: ["dptrain.io"]
  resources: ["dptrainingjobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["dptrain.io"]
  resources: ["dptrainingjobs/status"]
  verbs: ["get", "patch"]
{{- /* DPDatasets: the operator keeps each dataset's ledger (status) and its finalizer. */}}
- apiGroups: ["dptrain.io"]
  resources: ["dpdatasets"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["dptrain.io"]
  resources: ["dpdatasets/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- /* Per-job children, addressed by name: no list/watch, so no bulk read of other objects. */}}
- apiGroups: [""]
  resources: ["configmaps", "serviceaccounts", "services"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch", "delete"]
{{- /* Each job's secret key (immutable, owned by the job): create only, never read. */}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- /* Trainer pods are read (listed by label, never watched): scheduling problems,
disruptions and termination messages are reported in the job's status. */}}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
{{- /* Workloads are also watched: the operator reacts when a trainer finishes or fails. */}}
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- /* Peering (several replicas): kopf watches and patches the peering object, which the
operator creates at startup if missing. Cluster scope: one ClusterKopfPeering; namespaced: a
KopfPeering in each watched namespace. */}}
- apiGroups: ["kopf.dev"]
  resources: [{{ ternary "clusterkopfpeerings" "kopfpeerings" (eq .Values.watch.scope "cluster") | quote }}]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- /* JobSets are always watched; they are managed unless workload=job. */}}
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  {{- if eq .Values.workload "job" }}
  verbs: ["get", "list", "watch"]
  {{- else }}
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
  {{- end }}
{{- end }}

{{/* True ("true") when the cluster serves the Prometheus operator's API. */}}
{{- define "dptrain.hasMonitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/* namespaceSelector for monitors: the watched namespaces, or all. */}}
{{- define "dptrain.monitorNamespaceSelector" -}}
{{- if eq .Values.watch.scope "namespaced" }}
matchNames:
  {{- range splitList "," (include "dptrain.watchedNamespaces" .) }}
  - {{ . | quote }}
  {{- end }}
{{- else }}
any: true
{{- end }}
{{- end }}

{{/* Whether the replicas run with kopf peering: more than one replica, or asked for. */}}
{{- define "dptrain.peering" -}}
{{- if or (gt (int .Values.replicas) 1) .Values.peering.enabled }}
{{- default (include "dptrain.fullname" .) .Values.peering.name }}
{{- end }}
{{- end }}
