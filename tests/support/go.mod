// The Go programs the tests build (tests/support/go.rs), with their
// dependencies from the Go module proxy. grpc-go is pinned at the version
// kubelet v1.37.2 pins, so the grpc-go caller speaks as current kubelet
// does; docker/distribution at the version Debian 12 ships (the reference
// grammar containerd 1.6 follows).
module ecr-pull-proxy/tests/support

go 1.26.0

require (
	github.com/docker/distribution v2.8.2+incompatible
	google.golang.org/grpc v1.82.1
)

require (
	github.com/opencontainers/go-digest v1.0.0 // indirect
	golang.org/x/net v0.53.0 // indirect
	golang.org/x/sys v0.43.0 // indirect
	golang.org/x/text v0.36.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260414002931-afd174a4e478 // indirect
	google.golang.org/protobuf v1.36.11 // indirect
)
