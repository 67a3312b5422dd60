// Command oracle answers as kubelet v1.37.2 and containerd 2.x do, with
// their own code imported, not transcribed (tests/matching.rs). It reads
// one JSON value per line of stdin and prints one JSON object per line:
//
//	oracle urlsmatch [pattern, name] -> whether kubelet's config validation
//	    accepts the pattern as a matchImages entry
//	    (credentialprovider.ParseSchemelessURL, as plugin/config.go calls
//	    it) and whether credentialprovider.URLsMatchStr(pattern, name);
//	oracle refparse "reference" -> what distribution/reference's
//	    ParseNormalizedNamed (containerd 2.x's and kubelet's parser) makes
//	    of it: the normalised name, tag and digest, or the error.
package main

import (
	"bufio"
	_ "crypto/sha256" // digests: the algorithms containerd links in
	_ "crypto/sha512"
	"encoding/json"
	"fmt"
	"os"

	"github.com/distribution/reference"
	"k8s.io/kubernetes/pkg/credentialprovider"
)

type match struct {
	Valid bool   `json:"valid"`
	Error string `json:"error,omitempty"`
	Match bool   `json:"match"`
}

func urlsmatch(line []byte) (interface{}, error) {
	var pair [2]string
	if err := json.Unmarshal(line, &pair); err != nil {
		return nil, err
	}
	var a match
	if _, err := credentialprovider.ParseSchemelessURL(pair[0]); err != nil {
		a.Error = err.Error()
	} else {
		a.Valid = true
		a.Match, _ = credentialprovider.URLsMatchStr(pair[0], pair[1])
	}
	return a, nil
}

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
		"urlsmatch": urlsmatch,
		"refparse":  refparse,
	}
	if len(os.Args) != 2 || modes[os.Args[1]] == nil {
		fmt.Fprintln(os.Stderr, "usage: oracle urlsmatch|refparse < JSON lines")
		os.Exit(2)
	}
	mode := modes[os.Args[1]]
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	enc := json.NewEncoder(out)
	for in.Scan() {
		a, err := mode(in.Bytes())
		if err == nil {
			err = enc.Encode(a)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}
