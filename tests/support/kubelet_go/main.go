// Command kubelet_go answers as kubelet and containerd do, from Go's own
// standard library and docker/distribution v2.8.2 (Debian 12's version). It reads one JSON value
// per line of stdin and prints one JSON object per line:
//
//	kubelet_go urlsmatch   [pattern, name] -> whether kubelet's config
//	    validation accepts the pattern as a matchImages entry
//	    (ParseSchemelessURL) and whether URLsMatchStr(pattern, name) is true;
//	kubelet_go refparse    "reference" -> what reference.ParseNormalizedNamed
//	    (containerd 1.6's and kubelet's grammar) makes of it: the normalised
//	    name, tag and digest, or the error.
//
// parseSchemelessURL, splitURL, urlsMatchStr and urlsMatch are a direct
// transcription of kubernetes pkg/credentialprovider/keyring.go; they run on
// Go's own net/url, net and path/filepath, so the tests compare the daemon
// with Go's parsing and globbing themselves, not with a second Rust copy.
package main

import (
	"bufio"
	_ "crypto/sha256" // digests: the algorithms containerd links in
	_ "crypto/sha512"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/docker/distribution/reference"
)

// parseSchemelessURL is kubelet's ParseSchemelessURL.
func parseSchemelessURL(schemelessURL string) (*url.URL, error) {
	parsed, err := url.Parse("https://" + schemelessURL)
	if err != nil {
		return nil, err
	}
	if err := bracketedHostIsIPv6(parsed.Host); err != nil {
		return nil, err
	}
	// clear out the resulting scheme
	parsed.Scheme = ""
	return parsed, nil
}

// bracketedHostIsIPv6 applies the rule Go 1.25.2 added to url.Parse
// (CVE-2025-47912: only an IPv6 address may stand in brackets) to what an
// older Go (Debian 12's 1.19) parsed; a no-op on Go 1.26; kubelet releases of 2026 are
// built with a Go that has it.
func bracketedHostIsIPv6(host string) error {
	if !strings.HasPrefix(host, "[") {
		return nil
	}
	i := strings.LastIndex(host, "]")
	addr, err := netip.ParseAddr(host[1:i])
	if err != nil {
		return fmt.Errorf("invalid host: %w", err)
	}
	if addr.Is4() {
		return errors.New("invalid IP-literal")
	}
	return nil
}

// splitURL is kubelet's SplitURL.
func splitURL(url *url.URL) (parts []string, port string) {
	host, port, err := net.SplitHostPort(url.Host)
	if err != nil {
		// could not parse port
		host, port = url.Host, ""
	}
	return strings.Split(host, "."), port
}

// urlsMatchStr is kubelet's URLsMatchStr.
func urlsMatchStr(glob string, target string) (bool, error) {
	globURL, err := parseSchemelessURL(glob)
	if err != nil {
		return false, err
	}
	targetURL, err := parseSchemelessURL(target)
	if err != nil {
		return false, err
	}
	return urlsMatch(globURL, targetURL)
}

// urlsMatch is kubelet's URLsMatch.
func urlsMatch(globURL *url.URL, targetURL *url.URL) (bool, error) {
	globURLParts, globPort := splitURL(globURL)
	targetURLParts, targetPort := splitURL(targetURL)
	if globPort != targetPort {
		// port doesn't match
		return false, nil
	}
	if len(globURLParts) != len(targetURLParts) {
		// host name does not have the same number of parts
		return false, nil
	}
	if !strings.HasPrefix(targetURL.Path, globURL.Path) {
		// the path of the credential must be a prefix
		return false, nil
	}
	for k, globURLPart := range globURLParts {
		targetURLPart := targetURLParts[k]
		matched, err := filepath.Match(globURLPart, targetURLPart)
		if err != nil {
			return false, err
		}
		if !matched {
			// glob mismatch for some part
			return false, nil
		}
	}
	// everything matches
	return true, nil
}

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
	if _, err := parseSchemelessURL(pair[0]); err != nil {
		a.Error = err.Error()
	} else {
		a.Valid = true
		a.Match, _ = urlsMatchStr(pair[0], pair[1])
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
		fmt.Fprintln(os.Stderr, "usage: kubelet_go urlsmatch|refparse < JSON lines")
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
