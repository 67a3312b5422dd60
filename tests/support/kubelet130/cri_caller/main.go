// A CRI caller built on kubelet v1.30.14's own image-service client
// (k8s.io/kubernetes/pkg/kubelet/cri/remote), dialled as kubelet 1.30
// dials `unix://SOCKET`.
//
// Usage: cri_caller SOCKET IMAGE
//
// Prints one line per call, as tests/support/grpc_go_client does:
// `name code sha256-of-answer-or-message` (ImageFsInfo: `-` for its
// answer, which carries a timestamp).
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/kubernetes/pkg/kubelet/cri/remote"
)

type marshaler interface{ Marshal() ([]byte, error) }

func result(err error, answers ...marshaler) (string, string) {
	if err != nil {
		s := status.Convert(err)
		return strings.ToUpper(s.Code().String()), strings.ReplaceAll(s.Message(), " ", "_")
	}
	h := sha256.New()
	for _, a := range answers {
		b, err := a.Marshal()
		if err != nil {
			return "MARSHAL", err.Error()
		}
		h.Write(b)
	}
	return "OK", hex.EncodeToString(h.Sum(nil))[:16]
}

func main() {
	socket, image := os.Args[1], os.Args[2]
	svc, err := remote.NewRemoteImageService("unix://"+socket, 2*time.Minute, trace.NewNoopTracerProvider())
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	ctx := context.Background()
	spec := &runtimeapi.ImageSpec{Image: image}
	missing := &runtimeapi.ImageSpec{Image: "docker.io/library/nope:v1"}
	status := func(name string, s *runtimeapi.ImageSpec) {
		r, err := svc.ImageStatus(ctx, s, false)
		code, digest := result(err, r)
		fmt.Println(name, code, digest)
	}
	fs, err := svc.ImageFsInfo(ctx)
	code, digest := result(err, fs)
	if code == "OK" {
		digest = "-"
	}
	fmt.Println("ImageFsInfo", code, digest)
	images, err := svc.ListImages(ctx, nil)
	answers := []marshaler{}
	for _, i := range images {
		answers = append(answers, i)
	}
	code, digest = result(err, answers...)
	fmt.Println("ListImages", code, digest)
	status("ImageStatus", spec)
	status("ImageStatus-missing", missing)
	ref, err := svc.PullImage(ctx, spec, nil, &runtimeapi.PodSandboxConfig{
		Metadata: &runtimeapi.PodSandboxMetadata{Name: "p", Namespace: "default", Uid: "u1"},
	})
	code, digest = result(err)
	if err == nil {
		digest = ref
	}
	fmt.Println("PullImage", code, digest)
	status("ImageStatus-after-pull", spec)
	code, _ = result(svc.RemoveImage(ctx, spec))
	fmt.Println("RemoveImage", code, "-")
	status("ImageStatus-after-remove", spec)
}
