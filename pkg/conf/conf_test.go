package conf

import (
	"flag"
	"testing"
	"time"
)

func TestParsePrecedence(t *testing.T) {
	t.Setenv("BULKHEAD_X_GRPC_ADDR", "env:1")
	t.Setenv("BULKHEAD_X_TIMEOUT", "3s")
	t.Setenv("BULKHEAD_X_KEYS", "a, b,,c")
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	addr := fs.String("grpc-addr", "default:1", "")
	timeout := fs.Duration("timeout", time.Second, "")
	other := fs.String("other", "d", "")
	var keys StringList
	fs.Var(&keys, "keys", "")
	if err := Parse(fs, "BULKHEAD_X", []string{"-grpc-addr", "flag:1"}); err != nil {
		t.Fatal(err)
	}
	if *addr != "flag:1" {
		t.Errorf("flag should win over env: %q", *addr)
	}
	if *timeout != 3*time.Second {
		t.Errorf("env should win over default: %v", *timeout)
	}
	if *other != "d" {
		t.Errorf("default lost: %q", *other)
	}
	if len(keys) != 3 || keys[2] != "c" {
		t.Errorf("keys = %q", keys)
	}
}

func TestParseBadEnv(t *testing.T) {
	t.Setenv("BULKHEAD_X_TIMEOUT", "soon")
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.Duration("timeout", time.Second, "")
	if err := Parse(fs, "BULKHEAD_X", nil); err == nil {
		t.Fatal("a bad duration in the environment was accepted")
	}
}

func TestMask(t *testing.T) {
	if got := Mask("dev-admin"); got != "de****in" {
		t.Errorf("Mask = %q", got)
	}
	if got := Mask("abc"); got != "****" {
		t.Errorf("Mask = %q", got)
	}
}
