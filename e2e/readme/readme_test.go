// Package readme keeps the README's configuration reference true: every flag
// of every service must be documented there with its environment variable.
package readme

import (
	"flag"
	"os"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/pkg/conf"
	"github.com/bulkhead-io/bulkhead/services/deliverer"
	"github.com/bulkhead-io/bulkhead/services/ingest"
	"github.com/bulkhead-io/bulkhead/services/monitor"
	"github.com/bulkhead-io/bulkhead/services/router"
)

func TestEveryFlagIsDocumented(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(readme)
	services := []struct {
		prefix   string
		register func(*flag.FlagSet)
	}{
		{ingest.EnvPrefix, func(fs *flag.FlagSet) { ingest.Flags(fs) }},
		{router.EnvPrefix, func(fs *flag.FlagSet) { router.Flags(fs) }},
		{deliverer.EnvPrefix, func(fs *flag.FlagSet) { deliverer.Flags(fs) }},
		{monitor.EnvPrefix, func(fs *flag.FlagSet) { monitor.Flags(fs) }},
	}
	for _, s := range services {
		fs := flag.NewFlagSet(s.prefix, flag.ContinueOnError)
		s.register(fs)
		n := 0
		fs.VisitAll(func(f *flag.Flag) {
			n++
			if !strings.Contains(text, "`-"+f.Name+"`") {
				t.Errorf("README does not document flag -%s of %s", f.Name, s.prefix)
			}
			env := conf.EnvName(s.prefix, f.Name)
			common := strings.Contains(text, "`"+conf.EnvName(ingest.EnvPrefix, f.Name)+"`")
			if !strings.Contains(text, "`"+env+"`") && !common {
				t.Errorf("README does not document %s", env)
			}
		})
		if n == 0 {
			t.Errorf("%s: no flags registered", s.prefix)
		}
	}
}
