// Command kubelet_go answers as containerd 1.6 reads image references, with
// docker/distribution v2.8.2 (Debian 12's version; containerd 1.6's
// grammar). It reads one JSON string per line of stdin and prints one JSON
// object per line:
//
//	kubelet_go refparse "reference" -> what reference.ParseNormalizedNamed
//	    makes of it: the normalised name, tag and digest, or the error.
//
// kubelet's own matcher and distribution/reference (containerd 2.x's and
// kubelet's parser) are imported in tests/support/kubelet137/oracle.
package main

import (
	"bufio"
	_ "crypto/sha256" // digests: the algorithms containerd links in
	_ "crypto/sha512"
	"encoding/json"
	"fmt"
	"os"

	"github.com/docker/distribution/reference"
)

type parsed struct {
	OK     bool   `json:"ok"`
	Error  string `json:"error,omitempty"`
	Name   string `json:"name,omitempty"`
	Tag    string `json:"tag,omitempty"`
	Digest string `json:"digest,omitempty"`
}

func refparse(line []byte) (interface{}, error) {
	var s string
	if err := json.Unmarshal(line, &s); err != nil {
		return nil, err
	}
	var a parsed
	named, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		a.Error = err.Error()
		return a, nil
	}
	a.OK = true
	a.Name = named.Name()
	if t, ok := named.(reference.Tagged); ok {
		a.Tag = t.Tag()
	}
	if d, ok := named.(reference.Digested); ok {
		a.Digest = d.Digest().String()
	}
	return a, nil
}

func main() {
	modes := map[string]func([]byte) (interface{}, error){
		"refparse": refparse,
	}
	if len(os.Args) != 2 || modes[os.Args[1]] == nil {
		fmt.Fprintln(os.Stderr, "usage: kubelet_go refparse < JSON lines")
		os.Exit(2)
	}
	answer := modes[os.Args[1]]
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	enc := json.NewEncoder(out)
	for in.Scan() {
		a, err := answer(in.Bytes())
		if err == nil {
			err = enc.Encode(a)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "kubelet_go:", err)
			os.Exit(2)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "kubelet_go:", err)
		os.Exit(2)
	}
}
