// A transparent gRPC proxy built on grpc-go, the design other CRI proxies
// ship: every method is taken by an unknown-service handler and streamed
// to the upstream as raw message bytes, metadata, headers and trailers
// copied. The peer benches/compare.rs measures ecr-pull-proxy against.
//
// Usage: grpc_go_proxy LISTEN_SOCKET UPSTREAM_SOCKET
//
// Built from tests/support/go.mod (grpc-go at the version kubelet pins).
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
)

// frame is one message, as bytes.
type frame struct{ payload []byte }

// raw replaces the proto codec: messages pass as they are.
type raw struct{}

func (raw) Marshal(v interface{}) ([]byte, error) { return v.(*frame).payload, nil }
func (raw) Unmarshal(data []byte, v interface{}) error {
	f := v.(*frame)
	f.payload = append(f.payload[:0], data...)
	return nil
}
func (raw) Name() string { return "proto" }

const maxMessage = 16 * 1024 * 1024

func forward(upstream *grpc.ClientConn) grpc.StreamHandler {
	return func(_ interface{}, ss grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(ss)
		in, _ := metadata.FromIncomingContext(ss.Context())
		out := metadata.MD{}
		for k, v := range in {
			if !strings.HasPrefix(k, ":") {
				out[k] = v
			}
		}
		ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(ss.Context(), out))
		defer cancel()
		cs, err := upstream.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method)
		if err != nil {
			return err
		}
		go func() {
			for {
				f := &frame{}
				if err := ss.RecvMsg(f); err != nil {
					if err == io.EOF {
						cs.CloseSend()
					} else {
						cancel()
					}
					return
				}
				if err := cs.SendMsg(f); err != nil {
					return
				}
			}
		}()
		headerSent := false
		for {
			f := &frame{}
			if err := cs.RecvMsg(f); err != nil {
				ss.SetTrailer(cs.Trailer())
				if err == io.EOF {
					return nil
				}
				return err
			}
			if !headerSent {
				if h, err := cs.Header(); err == nil {
					ss.SendHeader(h)
				}
				headerSent = true
			}
			if err := ss.SendMsg(f); err != nil {
				return err
			}
		}
	}
}

func main() {
	listen, upstreamPath := os.Args[1], os.Args[2]
	encoding.RegisterCodec(raw{})
	upstream, err := grpc.Dial("passthrough:///"+upstreamPath,
		grpc.WithInsecure(),
		grpc.WithAuthority("localhost"),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", upstreamPath)
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	os.Remove(listen)
	l, err := net.Listen("unix", listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	server := grpc.NewServer(
		grpc.UnknownServiceHandler(forward(upstream)),
		grpc.MaxRecvMsgSize(maxMessage),
		grpc.MaxSendMsgSize(maxMessage),
	)
	if err := server.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}
