//go:build tools

// The kubelet binary this module builds: `go build k8s.io/kubernetes/cmd/kubelet`.
package tools

import _ "k8s.io/kubernetes/cmd/kubelet"
