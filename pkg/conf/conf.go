// Package conf reads a service's configuration from flags and environment
// variables: a flag given on the command line wins over BULKHEAD_<SVC>_<FLAG>,
// which wins over the default.
package conf

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

// Parse parses args into fs, then sets every flag that was not given on the
// command line from the environment variable prefix + "_" + the flag's name in
// upper case with "-" as "_" (grpc-addr under BULKHEAD_INGEST is
// BULKHEAD_INGEST_GRPC_ADDR).
func Parse(fs *flag.FlagSet, prefix string, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		name := EnvName(prefix, f.Name)
		if v, ok := os.LookupEnv(name); ok {
			if serr := fs.Set(f.Name, v); serr != nil {
				err = fmt.Errorf("%s=%q: %w", name, v, serr)
			}
		}
	})
	return err
}

// EnvName is the environment variable that sets flag under prefix.
func EnvName(prefix, flag string) string {
	return prefix + "_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// StringList is a flag.Value holding a comma-separated list.
type StringList []string

// String implements flag.Value.
func (l *StringList) String() string { return strings.Join(*l, ",") }

// Set implements flag.Value; it replaces the list.
func (l *StringList) Set(s string) error {
	*l = nil
	for _, part := range strings.Split(s, ",") {
		if part = strings.TrimSpace(part); part != "" {
			*l = append(*l, part)
		}
	}
	return nil
}

// Mask hides a secret for logging, keeping a hint of which one it is.
func Mask(secret string) string {
	if len(secret) <= 4 {
		return "****"
	}
	return secret[:2] + "****" + secret[len(secret)-2:]
}
