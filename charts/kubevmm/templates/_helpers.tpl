{{/* Common names and labels. */}}
{{- define "kubevmm.labels" -}}
app.kubernetes.io/part-of: kubevmm
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kubevmm.operator.selector" -}}
app.kubernetes.io/name: kubevmm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubevmm.nodeVmm.selector" -}}
app.kubernetes.io/name: node-vmm
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The Lease namespace is fixed in the binaries (crds/src/contract.rs). */}}
{{- define "kubevmm.leaseNamespace" -}}kubevmm-system{{- end -}}

{{- define "kubevmm.operator.sa" -}}{{ .Release.Name }}-operator{{- end -}}
{{- define "kubevmm.nodeVmm.sa" -}}{{ .Release.Name }}-node-vmm{{- end -}}

{{- define "kubevmm.operator.image" -}}
{{ .Values.operator.image.repository }}:{{ .Values.operator.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- define "kubevmm.nodeVmm.image" -}}
{{ .Values.nodeVmm.image.repository }}:{{ .Values.nodeVmm.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* true when prometheus-operator's API is served (or forced). */}}
{{- define "kubevmm.hasServiceMonitor" -}}
{{- if or .Values.metrics.serviceMonitor.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") -}}true{{- end -}}
{{- end -}}
{{- define "kubevmm.hasPrometheusRule" -}}
{{- if or .Values.metrics.prometheusRule.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule") -}}true{{- end -}}
{{- end -}}

{{/* The Secrets of the subresource API and the node access paths (templates/access.yaml). */}}
{{- define "kubevmm.access.servingSecret" -}}
{{- .Values.access.servingSecret | default (printf "%s-access-serving" .Release.Name) -}}
{{- end -}}
{{- define "kubevmm.access.nodeServingSecret" -}}
{{- .Values.access.nodeSecrets.serving | default (printf "%s-node-serving" .Release.Name) -}}
{{- end -}}
{{- define "kubevmm.access.nodeClientSecret" -}}
{{- .Values.access.nodeSecrets.client | default (printf "%s-node-client" .Release.Name) -}}
{{- end -}}
