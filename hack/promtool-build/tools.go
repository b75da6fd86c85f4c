//go:build tools

// Package tools pins the commands this wrapper module builds: prometheus
// (the local cluster's, hack/prometheus.sh) and promtool (the tests).
// github.com/prometheus/prometheus has exclude directives in its go.mod,
// which `go install pkg@version` refuses; a wrapper module accepts them.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
