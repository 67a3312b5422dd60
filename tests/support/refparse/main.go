// Command refparse reads image references the way containerd 1.6 and
// kubelet do: for each line of stdin, a JSON string, it prints one JSON
// object with what reference.ParseNormalizedNamed (docker/distribution, from
// Debian's golang-github-docker-distribution-dev) makes of it: the
// normalised name, tag and digest, or the error.
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

type answer struct {
	OK     bool   `json:"ok"`
	Error  string `json:"error,omitempty"`
	Name   string `json:"name,omitempty"`
	Tag    string `json:"tag,omitempty"`
	Digest string `json:"digest,omitempty"`
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	enc := json.NewEncoder(out)
	for in.Scan() {
		var s string
		if err := json.Unmarshal(in.Bytes(), &s); err != nil {
			fmt.Fprintln(os.Stderr, "refparse: bad input line:", err)
			os.Exit(2)
		}
		var a answer
		named, err := reference.ParseNormalizedNamed(s)
		if err != nil {
			a.Error = err.Error()
		} else {
			a.OK = true
			a.Name = named.Name()
			if t, ok := named.(reference.Tagged); ok {
				a.Tag = t.Tag()
			}
			if d, ok := named.(reference.Digested); ok {
				a.Digest = d.Digest().String()
			}
		}
		if err := enc.Encode(a); err != nil {
			fmt.Fprintln(os.Stderr, "refparse:", err)
			os.Exit(2)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "refparse:", err)
		os.Exit(2)
	}
}
