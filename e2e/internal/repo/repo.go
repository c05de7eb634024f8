// Package repo finds the repository from a test or a tool run inside it.
package repo

import (
	"errors"
	"os"
	"path/filepath"
)

// Root returns the directory holding go.work, searching upwards from the
// working directory.
func Root() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.work")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.work not found above the working directory; run from the repository")
		}
		dir = parent
	}
}
