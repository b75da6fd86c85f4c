//go:build tools

// Package tools pins the command this wrapper module builds: promtool.
// github.com/prometheus/prometheus has exclude directives in its go.mod,
// which `go install pkg@version` refuses; a wrapper module accepts them.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
