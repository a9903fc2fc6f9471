{{/* Chart name, overridable. */}}
{{- define "weightsync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>" (or the release name when it already contains the chart name), 63 chars max. */}}
{{- define "weightsync.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "weightsync.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "weightsync.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "weightsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: weightsync
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (operator, daemon). Call with (dict "ctx" . "component" "x"). */}}
{{- define "weightsync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weightsync.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "weightsync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "weightsync.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the daemons' bearer token (key "token"). */}}
{{- define "weightsync.authSecretName" -}}
{{- default (printf "%s-auth" (include "weightsync.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Peering is used when more than one operator replica runs. */}}
{{- define "weightsync.peering" -}}
{{- if gt (int .Values.operator.replicas) 1 -}}true{{- end -}}
{{- end -}}

{{- define "weightsync.peeringName" -}}
{{- default (include "weightsync.fullname" .) .Values.operator.peering.name -}}
{{- end -}}

{{/* image reference; call with (dict "image" .Values.x.image "ctx" .) */}}
{{- define "weightsync.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* The environment variable that carries the bearer token, from the auth Secret. */}}
{{- define "weightsync.authEnv" -}}
- name: WEIGHTSYNC_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "weightsync.authSecretName" . }}
      key: token
{{- end -}}

{{/* The job label Prometheus gives the chart's metrics targets (ServiceMonitor jobLabel). */}}
{{- define "weightsync.metricsJob" -}}
{{- include "weightsync.name" . -}}
{{- end -}}
