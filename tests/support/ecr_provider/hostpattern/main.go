// Command hostpattern answers as ecr-credential-provider's registry host
// pattern does (tests/matching.rs). The pattern is read from the
// provider's own source, the `ecrPrivateHostPattern` variable of
// cmd/ecr-credential-provider/main.go in the module directory given as the
// only argument, and compiled as the provider compiles it; it is never
// copied here. Each line of stdin is a JSON string (a registry host); each
// line of stdout the match: whether it matched, and the account, region
// and FIPS groups.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
)

type answer struct {
	Ok      bool   `json:"ok"`
	Account string `json:"account,omitempty"`
	Region  string `json:"region,omitempty"`
	Fips    bool   `json:"fips"`
}

// pattern finds `var ecrPrivateHostPattern = regexp.MustCompile("...")`.
func pattern(moduleDir string) (string, error) {
	path := filepath.Join(moduleDir, "cmd", "ecr-credential-provider", "main.go")
	file, err := parser.ParseFile(token.NewFileSet(), path, nil, 0)
	if err != nil {
		return "", err
	}
	for _, decl := range file.Decls {
		gen, ok := decl.(*ast.GenDecl)
		if !ok || gen.Tok != token.VAR {
			continue
		}
		for _, spec := range gen.Specs {
			value := spec.(*ast.ValueSpec)
			for i, name := range value.Names {
				if name.Name != "ecrPrivateHostPattern" || i >= len(value.Values) {
					continue
				}
				call, ok := value.Values[i].(*ast.CallExpr)
				if !ok || len(call.Args) != 1 {
					return "", fmt.Errorf("%s: ecrPrivateHostPattern is not regexp.MustCompile(literal)", path)
				}
				sel, ok := call.Fun.(*ast.SelectorExpr)
				lit, isLit := call.Args[0].(*ast.BasicLit)
				if !ok || sel.Sel.Name != "MustCompile" || !isLit || lit.Kind != token.STRING {
					return "", fmt.Errorf("%s: ecrPrivateHostPattern is not regexp.MustCompile(literal)", path)
				}
				return strconv.Unquote(lit.Value)
			}
		}
	}
	return "", fmt.Errorf("%s: no ecrPrivateHostPattern variable", path)
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: hostpattern MODULE_DIR < hosts")
		os.Exit(2)
	}
	source, err := pattern(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	re := regexp.MustCompile(source)
	// account, FIPS and region are the provider's groups 1, 2 and 3
	// (parseRegionFromECRPrivateHost takes group 3 of 5).
	if re.NumSubexp() != 4 {
		fmt.Fprintf(os.Stderr, "the pattern has %d groups, not the 4 this reads: %s\n", re.NumSubexp(), source)
		os.Exit(1)
	}
	in := bufio.NewScanner(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var host string
		if err := json.Unmarshal(in.Bytes(), &host); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		var a answer
		if m := re.FindStringSubmatch(host); m != nil {
			a = answer{Ok: true, Account: m[1], Fips: m[2] != "", Region: m[3]}
		}
		if err := out.Encode(a); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
