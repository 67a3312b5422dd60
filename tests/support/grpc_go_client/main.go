// A CRI caller built on grpc-go, kubelet's gRPC library, for
// tests/interop.rs.
//
// Usage: grpc_go_client SOCKET IMAGE [watch:SECONDS | cancel:MS | echo]
//
// Calls SOCKET with raw protobuf bytes (a codec that passes bytes through),
// so no generated code is needed, and prints one line per call:
// `name code sha256-of-answer-or-message`. Then makes 600 calls from 32
// goroutines on one connection, mixed with 20 pulls, and prints how many
// did not end as expected.
//
// With cancel:MS it starts a pull of IMAGE with no deadline, cancels it
// after MS milliseconds while the connection stays open, and calls
// ImageFsInfo on the same connection before and after (see cancelPull);
// then it prints `# holding` and keeps the connection open until its
// standard input closes.
//
// With echo (against tests' scripted upstream) it sends an ImageStatus
// whose message carries a field no CRI version defines and prints `echo
// same` when the echoed answer is byte for byte the message sent, then
// calls StreamImages asking for 5,000 messages and prints `stream N CODE`.
//
// With watch:SECONDS it instead calls ImageFsInfo every 20 ms on one
// connection, as kubelet keeps calling its runtime, until its standard
// input closes (or SECONDS pass), and prints `unix-milliseconds code
// message` for each call, then `# ready N`: how many times the connection
// became ready (1 when the caller kept one connection throughout).
//
// GRPC_GO_DIAL chooses how it dials, so that every `:authority` a grpc-go
// caller sends is covered (tests/authority.rs):
//
//	kubelet (default)  passthrough:///SOCKET + WithAuthority("localhost"),
//	                   as kubelet and crictl >= 1.31 dial: `localhost`
//	unix               grpc.NewClient("unix://SOCKET"): grpc-go's own unix
//	                   resolver
//	passthrough        passthrough:///SOCKET, no WithAuthority: the socket
//	                   path, percent-encoded (grpc-go >= 1.57)
//	bare               grpc.Dial("SOCKET") with a dialer, as kubelet < 1.31
//	                   dialled: the same percent-encoded path
//	raw-path           WithAuthority(SOCKET): the raw path, as grpc-go < 1.57
//	                   (kubelet and crictl <= 1.28) and grpc-java send it
//
// Built from tests/support/go.mod: grpc-go at the version kubelet pins.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// raw passes message bytes through as they are.
type raw struct{}

func (raw) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (raw) Name() string { return "proto" }

// field is a length-delimited protobuf field (payloads under 128 bytes).
func field(number int, payload []byte) []byte {
	if len(payload) >= 128 {
		panic("payload too long")
	}
	return append([]byte{byte(number<<3 | 2), byte(len(payload))}, payload...)
}

// call makes one unary call: the code's name and the answer's digest, or
// the error message with spaces as underscores.
func call(conn *grpc.ClientConn, method string, body []byte) (string, string) {
	return callWithin(conn, method, body, 60*time.Second)
}

func callWithin(conn *grpc.ClientConn, method string, body []byte, timeout time.Duration) (string, string) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var answer []byte
	err := conn.Invoke(ctx, "/runtime.v1.ImageService/"+method, &body, &answer, grpc.ForceCodec(raw{}))
	if err != nil {
		s := status.Convert(err)
		return strings.ToUpper(s.Code().String()), strings.ReplaceAll(s.Message(), " ", "_")
	}
	sum := sha256.Sum256(answer)
	return "OK", hex.EncodeToString(sum[:])[:16]
}

// watchReady counts how many times conn becomes ready; the function it
// returns prints `# ready N`.
func watchReady(conn *grpc.ClientConn) func() {
	var mu sync.Mutex
	ready := 0
	go func() {
		state := conn.GetState()
		for {
			if state == connectivity.Ready {
				mu.Lock()
				ready++
				mu.Unlock()
			}
			if !conn.WaitForStateChange(context.Background(), state) {
				return
			}
			state = conn.GetState()
		}
	}()
	return func() {
		mu.Lock()
		defer mu.Unlock()
		fmt.Println("# ready", ready)
	}
}

// cancelPull starts a pull of spec with no deadline, cancels it after
// wait (a pod deleted while its image pulls: kubelet cancels the call's
// context, which resets that one stream), and calls ImageFsInfo on the
// same connection before and after. Prints `pull CODE`, `during CODE`,
// `after CODE` and `# ready N`.
func cancelPull(conn *grpc.ClientConn, spec []byte, wait time.Duration) {
	printReady := watchReady(conn)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan string)
	go func() {
		var answer []byte
		body := spec
		err := conn.Invoke(ctx, "/runtime.v1.ImageService/PullImage", &body, &answer, grpc.ForceCodec(raw{}))
		done <- strings.ToUpper(status.Convert(err).Code().String())
	}()
	time.Sleep(wait)
	during, _ := call(conn, "ImageFsInfo", nil)
	cancel()
	pull := <-done
	after, _ := call(conn, "ImageFsInfo", nil)
	fmt.Println("pull", pull)
	fmt.Println("during", during)
	fmt.Println("after", after)
	printReady()
	// The connection stays open until standard input closes, so that the
	// test can watch containerd give up the pull while it is (the reset
	// must do it, not the connection's teardown).
	fmt.Println("# holding")
	io.Copy(io.Discard, os.Stdin)
	conn.Close()
}

// echo: see the file's comment.
func echo(conn *grpc.ClientConn, image []byte) {
	message := append(field(1, field(1, image)), 0x10, 0x01, 0x9a, 0x06, 0x03, 'n', 'e', 'w')
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "x-script", "echo"), 30*time.Second)
	defer cancel()
	var answer []byte
	body := message
	if err := conn.Invoke(ctx, "/runtime.v1.ImageService/ImageStatus", &body, &answer, grpc.ForceCodec(raw{})); err != nil {
		fmt.Println("echo", strings.ToUpper(status.Convert(err).Code().String()))
	} else if string(answer) == string(message) {
		fmt.Println("echo same")
	} else {
		fmt.Println("echo differs")
	}
	sctx, scancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "x-script", "stream:5000"), 60*time.Second)
	defer scancel()
	stream, err := conn.NewStream(sctx, &grpc.StreamDesc{ServerStreams: true}, "/runtime.v1.ImageService/StreamImages", grpc.ForceCodec(raw{}))
	count, code := 0, "OK"
	if err == nil {
		empty := []byte{}
		err = stream.SendMsg(&empty)
	}
	if err == nil {
		err = stream.CloseSend()
	}
	for err == nil {
		var m []byte
		if err = stream.RecvMsg(&m); err == nil {
			count++
		}
	}
	if err != io.EOF {
		code = strings.ToUpper(status.Convert(err).Code().String())
	}
	fmt.Println("stream", count, code)
}

// dial connects to socket the way GRPC_GO_DIAL says (see the file's comment).
func dial(socket string) (*grpc.ClientConn, error) {
	dialer := grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	})
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16 * 1024 * 1024)),
	}
	switch mode := os.Getenv("GRPC_GO_DIAL"); mode {
	case "", "kubelet":
		return grpc.NewClient("passthrough:///"+socket, append(opts, dialer, grpc.WithAuthority("localhost"))...)
	case "unix":
		return grpc.NewClient("unix://"+socket, opts...)
	case "passthrough":
		return grpc.NewClient("passthrough:///"+socket, append(opts, dialer)...)
	case "bare":
		//lint:ignore SA1019 kubelet < 1.31 dialled with grpc.DialContext and a bare path
		return grpc.Dial(socket, append(opts, dialer)...)
	case "raw-path":
		return grpc.NewClient("passthrough:///"+socket, append(opts, dialer, grpc.WithAuthority(socket))...)
	default:
		return nil, fmt.Errorf("GRPC_GO_DIAL=%q: want kubelet, unix, passthrough, bare or raw-path", mode)
	}
}

func main() {
	socket, image := os.Args[1], []byte(os.Args[2])
	conn, err := dial(socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	defer conn.Close()
	if len(os.Args) > 3 && strings.HasPrefix(os.Args[3], "watch:") {
		seconds, err := strconv.Atoi(strings.TrimPrefix(os.Args[3], "watch:"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "watch:", err)
			os.Exit(2)
		}
		stop := make(chan struct{})
		go func() {
			io.Copy(io.Discard, os.Stdin)
			close(stop)
		}()
		printReady := watchReady(conn)
		deadline := time.After(time.Duration(seconds) * time.Second)
		for {
			code, message := callWithin(conn, "ImageFsInfo", nil, 5*time.Second)
			if code == "OK" {
				message = "-"
			}
			fmt.Println(time.Now().UnixMilli(), code, message)
			select {
			case <-stop:
				printReady()
				return
			case <-deadline:
				printReady()
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	spec := field(1, field(1, image))
	if len(os.Args) > 3 && os.Args[3] == "echo" {
		echo(conn, image)
		return
	}
	if len(os.Args) > 3 && strings.HasPrefix(os.Args[3], "cancel:") {
		ms, err := strconv.Atoi(strings.TrimPrefix(os.Args[3], "cancel:"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "cancel:", err)
			os.Exit(2)
		}
		cancelPull(conn, spec, time.Duration(ms)*time.Millisecond)
		return
	}
	calls := []struct {
		name, method string
		body         []byte
	}{
		{"ImageFsInfo", "ImageFsInfo", nil},
		{"ListImages", "ListImages", nil},
		{"ImageStatus", "ImageStatus", spec},
		{"ImageStatus-missing", "ImageStatus", field(1, field(1, []byte("docker.io/library/nope:v1")))},
		{"Unknown", "NoSuchMethod", nil},
		{"PullImage", "PullImage", spec},
		{"ImageStatus-after-pull", "ImageStatus", spec},
		{"RemoveImage", "RemoveImage", spec},
		{"ImageStatus-after-remove", "ImageStatus", spec},
	}
	for _, c := range calls {
		code, digest := call(conn, c.method, c.body)
		if c.method == "ImageFsInfo" && code == "OK" {
			digest = "-" // its answer carries a timestamp
		}
		fmt.Println(c.name, code, digest)
	}

	mixed := []struct {
		method string
		body   []byte
	}{{"ListImages", nil}, {"ImageStatus", spec}, {"ImageFsInfo", nil}}
	jobs := make(chan int)
	var failed, total int
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				method, body := "PullImage", spec
				if i < 600 {
					method, body = mixed[i%3].method, mixed[i%3].body
				}
				code, _ := call(conn, method, body)
				mu.Lock()
				total++
				if code != "OK" {
					failed++
				}
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < 620; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	fmt.Println("concurrent", total, failed)
}
