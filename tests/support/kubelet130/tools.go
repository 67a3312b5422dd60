//go:build tools

// kubelet v1.30.14 itself is built from this module too
// (`go build k8s.io/kubernetes/cmd/kubelet`, tests/kubelet.rs).
package tools

import _ "k8s.io/kubernetes/cmd/kubelet"
